"""Small-batch kernel (2 to 16 rows of x): the chunk gemv's loads, the tensor cores' products.

At M = 16 the fused kernel (:func:`~.kernels.db_matmul_kernel`, ``BLOCK_M = 16``) streams
about a third to a half of the copy bandwidth (results.md section 5): Triton moves the code words
and x through its own pipeline and layouts. The batch-1 chunk gemv (:mod:`.gemv_chunk`) gets
75% with loads it issues itself, but multiplies on the CUDA cores, which at 16 rows would need
eight ``f16x2`` FMAs per weight. This kernel keeps the chunk gemv's memory side and hands the
products to ``mma.sync.m16n8k16`` (f16 inputs, f32 accumulators), written in inline PTX.

Every tensor is ``[TILES, 32 * num_warps]`` in Triton's default layout: element ``(t, i)`` lives
in thread ``i``, register ``t`` (no ``tl.load``, ``tl.store`` or reduction: every memory access
is inline asm, so no layout pass moves an element to another thread, which would break the
warp-wide ``mma``). Lane ``l`` of a warp has ``r = l // 4`` and ``q = l % 4``, the fragment
coordinates of the PTX ISA. Warp ``w`` owns ``TILES`` tiles of 16 weight rows; in tile ``t``
the lane holds rows ``R + r`` and ``R + r + 8``.

The K dimension inside an ``mma`` can be permuted freely as long as A and B use the same
permutation. Per chunk of ``64 V`` features (``V`` code words per row and lane), lane ``q``
takes the words ``qV .. qV + V - 1`` of its two rows: one ``V``-word load per row, and x for
those words is ``16 V`` contiguous fp16 per token (``2 V`` 16-byte loads). Each word is decoded
(:func:`_word_pairs`: two masks, 16 byte permutes) into its eight fp16 weight pairs ``P0..P7``
(pair ``p`` = elements ``2p, 2p+1``); k-slice ``s`` (0..3) of the word feeds the ``mma`` with

    A: a0 = P(2s) of row r, a1 = P(2s) of row r+8, a2 = P(2s+1) of row r, a3 = P(2s+1) of row r+8
    B: b0 = x pair 2s, b1 = x pair 2s+1 of token j*8 + r (n-tile j)

i.e. fragment column ``2q + h`` is element ``4s + h`` and column ``2q + 8 + h`` element
``4s + 2 + h`` of lane ``q``'s word, for A and B alike. The accumulator ``c0..c3`` of n-tile
``j`` is rows ``r, r, r+8, r+8`` times tokens ``8j + 2q, 8j + 2q + 1, 8j + 2q, 8j + 2q + 1``.
``NJ = 1`` (M <= 8) issues one n-tile.

Code words and scales of the next chunk are loaded before the current chunk is decoded
(register double buffering, as in the gemvs); split-K as in the other kernels (float32
partials, :mod:`.splitk`). Needs fp16 x with 16-byte aligned rows, K a multiple of the chunk,
G a multiple of ``16 V`` (the launcher checks, :func:`mma_applies`).

Under the Triton interpreter (no inline asm, no warps) the same tensors and index arithmetic
compute each accumulator element directly from whole code words (:func:`~.gemv._word_dot`): it
tests the rows, tokens, chunks, splits and the epilogue, not the fragment layout, which only
the GPU tests check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import _ld32, _load_pairs, _packed_luts, _word_dot, _zero_unless
from .gemv_chunk import _ld_words, _ld_x_word
from .kernels import _group_luts

__all__ = ["db_mma16_kernel", "mma_applies", "launch_mma16"]

_PAIRS_ASM = tl.constexpr(
    "{ .reg .b32 m, n, s, a, b, o0, o1, o2, o3, o4, o5, o6, o7; "
    "and.b32 m, $8, 0x33333333; shr.b32 n, $8, 2; and.b32 n, n, 0x33333333; "
    "prmt.b32 a, $9, $9, m; prmt.b32 b, $10, $10, m; prmt.b32 o0, a, b, 0x5140; prmt.b32 o4, a, b, 0x7362; "
    "prmt.b32 a, $9, $9, n; prmt.b32 b, $10, $10, n; prmt.b32 o1, a, b, 0x5140; prmt.b32 o5, a, b, 0x7362; "
    "shr.b32 s, m, 16; prmt.b32 a, $9, $9, s; prmt.b32 b, $10, $10, s; "
    "prmt.b32 o2, a, b, 0x5140; prmt.b32 o6, a, b, 0x7362; "
    "shr.b32 s, n, 16; prmt.b32 a, $9, $9, s; prmt.b32 b, $10, $10, s; "
    "prmt.b32 o3, a, b, 0x5140; prmt.b32 o7, a, b, 0x7362; "
    "mov.b32 $0, o0; mov.b32 $1, o1; mov.b32 $2, o2; mov.b32 $3, o3; "
    "mov.b32 $4, o4; mov.b32 $5, o5; mov.b32 $6, o6; mov.b32 $7, o7; }"
)


@triton.jit
def _word_pairs(w, lut_lo, lut_hi):
    """A code word's eight fp16 weight pairs (``int32``; pair p = elements 2p, 2p+1). The outputs
    are written last: an output may share a register with an input."""
    return tl.inline_asm_elementwise(_PAIRS_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, lut_lo, lut_hi],
                                     dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``mma.sync.aligned.m16n8k16`` (f16 x f16 + f32), one per warp and register."""
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
        "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
        [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32,) * 4, is_pure=True, pack=1)


@triton.jit
def _word_mma(pa, pb, x, acc):
    """The four k-slices of one word (pairs ``pa`` of row r, ``pb`` of row r+8) against x pairs ``x``."""
    c0, c1, c2, c3 = acc
    c0, c1, c2, c3 = _mma(pa[0], pb[0], pa[1], pb[1], x[0], x[1], c0, c1, c2, c3)
    c0, c1, c2, c3 = _mma(pa[2], pb[2], pa[3], pb[3], x[2], x[3], c0, c1, c2, c3)
    c0, c1, c2, c3 = _mma(pa[4], pb[4], pa[5], pb[5], x[4], x[5], c0, c1, c2, c3)
    c0, c1, c2, c3 = _mma(pa[6], pb[6], pa[7], pb[7], x[6], x[7], c0, c1, c2, c3)
    return c0, c1, c2, c3


@triton.jit
def _st(addr, v, ok, F16: tl.constexpr):
    """Store ``v`` (float32; rounded to fp16 with ``F16``) at ``addr`` where ``ok``; asm, returns 0."""
    if F16:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b16 h; setp.ne.b32 p, $2, 0; cvt.rn.f16.f32 h, $3; @p st.global.b16 [$1], h; "
            "mov.b32 $0, 0; }", "=r,l,r,f", [addr, ok, v], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.f32 [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,f", [addr, ok, v], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ld_f16(addr):
    """The fp16 at each address, as float32 (asm)."""
    return tl.inline_asm_elementwise("{ .reg .b16 h; ld.global.nc.b16 h, [$1]; cvt.f32.f16 $0, h; }", "=f,l",
                                     [addr], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _ld_x(x_chunk, tok, M, V: tl.constexpr, MASK: tl.constexpr, STRIDED: tl.constexpr):
    """x pairs of the lane's ``V`` words for token ``tok`` (``[1, NT]``; with ``MASK``, zero for
    tokens >= M, whose address is a clamped real row). Word ``J`` of the lane is ``32 J`` bytes
    after the first (``STRIDED``: ``128 J``)."""
    ok = tok < M
    addr = x_chunk.to(tl.int64, bitcast=True)
    xa = _x_pairs(addr, ok, 0, MASK)
    xb = xa
    xc = xa
    xd = xa
    if V >= 2:
        xb = _x_pairs(addr, ok, 4 if STRIDED else 1, MASK)
    if V == 4:
        xc = _x_pairs(addr, ok, 8 if STRIDED else 2, MASK)
        xd = _x_pairs(addr, ok, 12 if STRIDED else 3, MASK)
    return xa, xb, xc, xd


@triton.jit
def _ld_x_tiles(x0, x1, c, tok0, M, CK: tl.constexpr, V: tl.constexpr, NJ: tl.constexpr, MASK: tl.constexpr,
                STRIDED: tl.constexpr):
    """Chunk ``c``'s x pairs of both n-tiles (tokens ``tok0`` and ``tok0 + 8``; the second is the
    first again when ``NJ == 1``)."""
    xa = _ld_x(x0 + c * (CK // 2), tok0, M, V, MASK, STRIDED)
    xb = xa
    if NJ == 2:
        xb = _ld_x(x1 + c * (CK // 2), tok0 + 8, M, V, MASK, STRIDED)
    return xa, xb


@triton.jit
def _x_pairs(addr, ok, W: tl.constexpr, MASK: tl.constexpr):
    """The eight x pairs of the word ``W`` words after ``addr`` (asm), zero where ``ok`` is false (``MASK``)."""
    if W < 4:
        p0, p1, p2, p3, p4, p5, p6, p7 = _ld_x_word(addr, W, False)
    else:
        p0, p1, p2, p3, p4, p5, p6, p7 = _ld_x_word(addr + 32 * W, 0, False)
    if MASK:
        p0, p1, p2, p3, p4, p5, p6, p7 = _zero_unless(ok, p0, p1, p2, p3, p4, p5, p6, p7)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _chunk_mma(wa, wb, sca, scb, xj, acc, V: tl.constexpr):
    """One chunk of one n-tile: decode the lane's words of rows r and r+8 (word ``J`` with the
    packed scales ``sca[J]`` / ``scb[J]``), ``4 V`` mmas."""
    acc = _word_mma(_pairs_of(wa, sca, 0), _pairs_of(wb, scb, 0), xj[0], acc)
    if V >= 2:
        acc = _word_mma(_pairs_of(wa, sca, 1), _pairs_of(wb, scb, 1), xj[1], acc)
    if V == 4:
        acc = _word_mma(_pairs_of(wa, sca, 2), _pairs_of(wb, scb, 2), xj[2], acc)
        acc = _word_mma(_pairs_of(wa, sca, 3), _pairs_of(wb, scb, 3), xj[3], acc)
    return acc


@triton.jit
def _pairs_of(w, sc, J: tl.constexpr):
    lut_lo, lut_hi = _packed_luts(sc[J])
    return _word_pairs(w[J], lut_lo, lut_hi)


@triton.jit
def _ref_dot(qw_row, sc_row, x_row, tok_ok, c, CK: tl.constexpr, GROUP: tl.constexpr):
    """Interpreter: the whole chunk ``c`` of one weight row times one token, float32 (``[T, NT]``)."""
    s = tl.zeros(qw_row.shape, dtype=tl.float32)
    for wi in tl.static_range(CK // 16):
        k0 = c * CK + 16 * wi
        word = tl.load(qw_row + k0 // 16)
        grp = sc_row + (k0 // GROUP) * 2
        lut_lo, lut_hi = _group_luts(tl.load(grp), tl.load(grp + 1), False, False)
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_pairs(x_row + k0 // 2, tok_ok)
        s += _word_dot(word, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7, False)
    return s


@triton.jit
def _ref_chunk(qa, qb, sa, sb, x_ptr, stride_xm, M, tok_lo, c, acc, CK: tl.constexpr, GROUP: tl.constexpr):
    """Interpreter form of one chunk of one n-tile: ``acc`` elements from whole code words."""
    c0, c1, c2, c3 = acc
    ok0 = tok_lo < M
    ok1 = (tok_lo + 1) < M
    x0 = x_ptr + tl.minimum(tok_lo, M - 1).to(tl.int64) * stride_xm
    x1 = x_ptr + tl.minimum(tok_lo + 1, M - 1).to(tl.int64) * stride_xm
    c0 += _ref_dot(qa, sa, x0, ok0, c, CK, GROUP)
    c1 += _ref_dot(qa, sa, x1, ok1, c, CK, GROUP)
    c2 += _ref_dot(qb, sb, x0, ok0, c, CK, GROUP)
    c3 += _ref_dot(qb, sb, x1, ok1, c, CK, GROUP)
    return c0, c1, c2, c3


@triton.jit
def _ld_words_pf(addr, V: tl.constexpr, L2PF: tl.constexpr):
    """:func:`~.gemv_chunk._ld_words` with an L2 prefetch size (``L2PF`` bytes, 0 = none): the
    lanes of a row read ``16 V`` bytes of it per chunk, so without it consecutive chunks of a row
    reach DRAM as separate 32-byte sectors one iteration apart."""
    if L2PF == 0:
        w0, w1, w2, w3 = _ld_words(addr, V)
    else:
        if L2PF == 256:
            ld: tl.constexpr = "ld.global.nc.L2::256B"
        elif L2PF == 128:
            ld: tl.constexpr = "ld.global.nc.L2::128B"
        else:
            ld: tl.constexpr = "ld.global.nc.L2::64B"
        if V == 4:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                ld + ".v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [addr],
                dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        elif V == 2:
            w0, w1 = tl.inline_asm_elementwise(ld + ".v2.b32 {$0, $1}, [$2];", "=r,=r,l", [addr],
                                               dtype=(tl.int32,) * 2, is_pure=True, pack=1)
            w2 = w0
            w3 = w0
        else:
            w0 = tl.inline_asm_elementwise(ld + ".b32 $0, [$1];", "=r,l", [addr], dtype=tl.int32, is_pure=True,
                                           pack=1)
            w1 = w0
            w2 = w0
            w3 = w0
    return w0, w1, w2, w3


@triton.jit
def _load_chunk(qa, qb, sa, sb, c, CK: tl.constexpr, GROUP: tl.constexpr, V: tl.constexpr,
                USE_ASM: tl.constexpr, L2PF: tl.constexpr = 0, STRIDED: tl.constexpr = False):
    """Code words and packed scales (one per word) of chunk ``c`` for rows r and r+8 (asm; zeros in
    the interpreter, whose chunk form loads what it needs itself). ``STRIDED``: the lane's words
    are 4 apart (one 4-byte load and one group each), else consecutive (one load, one group)."""
    if USE_ASM:
        if STRIDED:
            wa = _ld_strided((qa + c * (CK // 16)).to(tl.int64, bitcast=True), V)
            wb = _ld_strided((qb + c * (CK // 16)).to(tl.int64, bitcast=True), V)
            sca = _ld_scales((sa + ((c * CK) // GROUP) * 2).to(tl.int64, bitcast=True), V, GROUP)
            scb = _ld_scales((sb + ((c * CK) // GROUP) * 2).to(tl.int64, bitcast=True), V, GROUP)
        else:
            wa = _ld_words_pf((qa + c * (CK // 16)).to(tl.int64, bitcast=True), V, L2PF)
            wb = _ld_words_pf((qb + c * (CK // 16)).to(tl.int64, bitcast=True), V, L2PF)
            s_a = _ld32((sa + ((c * CK) // GROUP) * 2).to(tl.int64, bitcast=True))
            s_b = _ld32((sb + ((c * CK) // GROUP) * 2).to(tl.int64, bitcast=True))
            sca = (s_a, s_a, s_a, s_a)
            scb = (s_b, s_b, s_b, s_b)
    else:
        z = tl.zeros(qa.shape, dtype=tl.int32)
        wa = (z, z, z, z)
        wb = wa
        sca = wa
        scb = wa
    return wa, wb, sca, scb


@triton.jit
def _ld_strided(addr, V: tl.constexpr):
    """Words 0, 4, 8, 12 (the first ``V``) after each address."""
    w0 = _ld32(addr)
    w1 = w0
    w2 = w0
    w3 = w0
    if V >= 2:
        w1 = _ld32(addr + 16)
    if V == 4:
        w2 = _ld32(addr + 32)
        w3 = _ld32(addr + 48)
    return w0, w1, w2, w3


@triton.jit
def _ld_scales(addr, V: tl.constexpr, GROUP: tl.constexpr):
    """Packed scales of words 0, 4, 8, 12 after the word whose group's scales are at ``addr``
    (word ``4 J`` is ``64 J / G`` groups on: 4 bytes per group)."""
    s0 = _ld32(addr)
    s1 = s0
    s2 = s0
    s3 = s0
    if V >= 2:
        s1 = _ld32(addr + 4 * (64 // GROUP))
    if V == 4:
        s2 = _ld32(addr + 4 * (128 // GROUP))
        s3 = _ld32(addr + 4 * (192 // GROUP))
    return s0, s1, s2, s3


@triton.jit
def db_mma16_kernel(
    x_ptr,  # int32 view of fp16 activations [M, K/2] (row stride stride_xm pairs)
    qw_ptr,  # int32 [N, K_alloc/16] GPU-layout codes (row stride stride_qn words)
    sc_ptr,  # fp16 [N, K_alloc/G, 2] scales (row stride stride_sn)
    bias_ptr,  # fp16 [N] or dummy
    out_ptr,  # fp16 [M, N] (row stride stride_om); with SPLIT_K > 1 a float32 workspace [splits, M, N]
    M, N, K,
    CHUNKS_PER_SPLIT,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP: tl.constexpr, TILES: tl.constexpr, V: tl.constexpr, NJ: tl.constexpr, NWARPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    PREFETCH_X: tl.constexpr = True, MASK_M: tl.constexpr = True, L2PF: tl.constexpr = 0,
    STRIDED: tl.constexpr = False,
):
    """``out[:M, rows]`` for ``16 * TILES * NWARPS`` weight rows per program; grid ``(row blocks, splits)``.

    ``PREFETCH_X``: the next chunk's x is loaded with its code words (``16 V NJ`` registers more);
    ``MASK_M=False`` when ``M == 8 NJ`` (every B-fragment token is real: no selects).
    ``L2PF``: L2 prefetch size of the code-word loads in bytes (0, 64, 128, 256).
    ``STRIDED``: lane ``q`` takes words ``q, q + 4, ...`` of the chunk instead of ``qV .. qV + V - 1``:
    then for each of its x loads the four lanes of a quad read 64 contiguous bytes of one token (one
    128-byte line; consecutive words: four 16-byte pieces ``32 V`` bytes apart), for a 4-byte
    code-word load and a scale load per word.
    """
    NT: tl.constexpr = 32 * NWARPS
    CK: tl.constexpr = 64 * V  # features per chunk
    ROWS: tl.constexpr = 16 * TILES * NWARPS
    pid_n = tl.program_id(0)
    tid = tl.arange(0, NT)[None, :]
    lane = tid % 32
    r = lane // 4
    q = lane % 4
    row_a = pid_n * ROWS + (tid // 32) * (16 * TILES) + tl.arange(0, TILES)[:, None] * 16 + r  # [T, NT]
    row_b = row_a + 8
    n_chunks = K // CK
    if SPLIT_K == 1:
        c_lo = 0
        c_hi = n_chunks
    else:
        pid_k = tl.program_id(1)
        c_lo = pid_k * CHUNKS_PER_SPLIT
        c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, n_chunks)
        out_ptr += pid_k.to(tl.int64) * M * N
    if USE_ASM:  # the lane's first word and its group, per row
        LW: tl.constexpr = 1 if STRIDED else V  # words between the first words of lanes q and q + 1
        qa = qw_ptr + tl.minimum(row_a, N - 1).to(tl.int64) * stride_qn + q * LW
        qb = qw_ptr + tl.minimum(row_b, N - 1).to(tl.int64) * stride_qn + q * LW
        sa = sc_ptr + tl.minimum(row_a, N - 1).to(tl.int64) * stride_sn + ((q * 16 * LW) // GROUP) * 2
        sb = sc_ptr + tl.minimum(row_b, N - 1).to(tl.int64) * stride_sn + ((q * 16 * LW) // GROUP) * 2
    else:  # whole rows
        qa = qw_ptr + tl.minimum(row_a, N - 1).to(tl.int64) * stride_qn
        qb = qw_ptr + tl.minimum(row_b, N - 1).to(tl.int64) * stride_qn
        sa = sc_ptr + tl.minimum(row_a, N - 1).to(tl.int64) * stride_sn
        sb = sc_ptr + tl.minimum(row_b, N - 1).to(tl.int64) * stride_sn
    tok0 = r  # B-fragment token of n-tile 0 (tile 1: r + 8)
    XW: tl.constexpr = 8 if STRIDED else 8 * V  # x pairs between the first words of lanes q and q + 1
    x0 = x_ptr + tl.minimum(tok0, M - 1).to(tl.int64) * stride_xm + q * XW  # lane's pairs in chunk 0
    x1 = x_ptr + tl.minimum(tok0 + 8, M - 1).to(tl.int64) * stride_xm + q * XW
    tok_lo = 2 * q  # accumulator tokens of n-tile 0: 2q, 2q + 1 (n-tile 1: + 8)

    zero = tl.zeros((TILES, NT), dtype=tl.float32)
    acc0 = (zero, zero, zero, zero)
    acc1 = (zero, zero, zero, zero)
    wa, wb, sca, scb = _load_chunk(qa, qb, sa, sb, c_lo, CK, GROUP, V, USE_ASM, L2PF, STRIDED)
    if USE_ASM:
        if PREFETCH_X:
            xa, xb = _ld_x_tiles(x0, x1, c_lo, tok0, M, CK, V, NJ, MASK_M, STRIDED)
    for c in range(c_lo, c_hi):
        # the next chunk's words and scales (the last iteration re-reads its own chunk)
        c_next = tl.minimum(c + 1, c_hi - 1)
        nwa, nwb, nsca, nscb = _load_chunk(qa, qb, sa, sb, c_next, CK, GROUP, V, USE_ASM, L2PF, STRIDED)
        if USE_ASM:
            if PREFETCH_X:
                nxa, nxb = _ld_x_tiles(x0, x1, c_next, tok0, M, CK, V, NJ, MASK_M, STRIDED)
            else:
                xa, xb = _ld_x_tiles(x0, x1, c, tok0, M, CK, V, NJ, MASK_M, STRIDED)
            acc0 = _chunk_mma(wa, wb, sca, scb, xa, acc0, V)
            if NJ == 2:
                acc1 = _chunk_mma(wa, wb, sca, scb, xb, acc1, V)
            if PREFETCH_X:
                xa = nxa
                xb = nxb
        else:
            acc0 = _ref_chunk(qa, qb, sa, sb, x_ptr, stride_xm, M, tok_lo, c, acc0, CK, GROUP)
            if NJ == 2:
                acc1 = _ref_chunk(qa, qb, sa, sb, x_ptr, stride_xm, M, tok_lo + 8, c, acc1, CK, GROUP)
        wa, wb, sca, scb = nwa, nwb, nsca, nscb

    ok_a = row_a < N
    ok_b = row_b < N
    if HAS_BIAS:
        if USE_ASM:
            bias_a = _ld_f16((bias_ptr + tl.minimum(row_a, N - 1)).to(tl.int64, bitcast=True))
            bias_b = _ld_f16((bias_ptr + tl.minimum(row_b, N - 1)).to(tl.int64, bitcast=True))
        else:
            bias_a = tl.load(bias_ptr + tl.minimum(row_a, N - 1)).to(tl.float32)
            bias_b = tl.load(bias_ptr + tl.minimum(row_b, N - 1)).to(tl.float32)
        acc0 = (acc0[0] + bias_a, acc0[1] + bias_a, acc0[2] + bias_b, acc0[3] + bias_b)
        acc1 = (acc1[0] + bias_a, acc1[1] + bias_a, acc1[2] + bias_b, acc1[3] + bias_b)
    _store_tile(out_ptr, stride_om, acc0, row_a, row_b, ok_a, ok_b, tok_lo, M, SPLIT_K == 1, USE_ASM)
    if NJ == 2:
        _store_tile(out_ptr, stride_om, acc1, row_a, row_b, ok_a, ok_b, tok_lo + 8, M, SPLIT_K == 1, USE_ASM)


@triton.jit
def _store_tile(out_ptr, stride_om, acc, row_a, row_b, ok_a, ok_b, tok_lo, M, F16: tl.constexpr,
                USE_ASM: tl.constexpr):
    """``acc`` of one n-tile: rows r, r, r+8, r+8 times tokens ``tok_lo, tok_lo + 1`` (twice)."""
    c0, c1, c2, c3 = acc
    t0 = tok_lo.to(tl.int64) * stride_om
    t1 = t0 + stride_om
    ok0 = tok_lo < M
    ok1 = (tok_lo + 1) < M
    if USE_ASM:
        _st((out_ptr + t0 + row_a).to(tl.int64, bitcast=True), c0, (ok_a & ok0).to(tl.int32), F16)
        _st((out_ptr + t1 + row_a).to(tl.int64, bitcast=True), c1, (ok_a & ok1).to(tl.int32), F16)
        _st((out_ptr + t0 + row_b).to(tl.int64, bitcast=True), c2, (ok_b & ok0).to(tl.int32), F16)
        _st((out_ptr + t1 + row_b).to(tl.int64, bitcast=True), c3, (ok_b & ok1).to(tl.int32), F16)
    else:
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + t0 + row_a, c0.to(ty), mask=ok_a & ok0)
        tl.store(out_ptr + t1 + row_a, c1.to(ty), mask=ok_a & ok1)
        tl.store(out_ptr + t0 + row_b, c2.to(ty), mask=ok_b & ok0)
        tl.store(out_ptr + t1 + row_b, c3.to(ty), mask=ok_b & ok1)


def mma_applies(x2: torch.Tensor, k: int, group_size: int, block_k: int) -> bool:
    """Whether :func:`db_mma16_kernel` reads ``x2 [M, K]`` with chunks of ``block_k`` features:
    fp16, 1 <= M <= 16, K a multiple of the chunk, G a multiple of ``block_k / 4`` (the lane's
    words share one group), 16-byte aligned rows (asm loads; not checked by the interpreter)."""
    from .launch import interpreted

    m = x2.shape[0]
    if x2.dtype != torch.float16 or not 1 <= m <= 16 or k % block_k or block_k not in (64, 128, 256):
        return False
    if group_size % (block_k // 4):
        return False
    if x2.stride(-1) != 1:
        return False
    if interpreted():
        return True
    return x2.storage_offset() % 8 == 0 and (m == 1 or x2.stride(0) % 8 == 0)


def launch_mma16(x2: torch.Tensor, gw, bias: torch.Tensor | None, cfg, wrap: bool = False,
                 out: torch.Tensor | None = None, prefetch_x: bool = True, l2pf: int = 0,
                 maxnreg: int | None = None, strided: bool = False) -> torch.Tensor:
    """``x2 [M, K] -> [M, N]`` with :func:`db_mma16_kernel` (``cfg.kind == "mma"``: ``block_n``
    rows per program = ``16 * tiles * num_warps``, ``block_k`` features per chunk = ``64 V``).
    Activations it cannot read (:func:`mma_applies`) run the fused kernel's untuned default.
    ``prefetch_x`` / ``l2pf`` / ``strided``: the kernel's ``PREFETCH_X`` / ``L2PF`` / ``STRIDED``; ``maxnreg``: a register cap per
    thread (for sweeps; the defaults are the swept choice). The compiled kernel of the last launch
    is kept in ``launch_mma16.last`` (register counts for sweeps)."""
    from .launch import _check_x, _kernel, _output, _split_target, check_config, interpreted, launch_matmul, \
        triton_cdiv
    from .splitk import launch_reduce
    from .tuning import default_config

    _check_x(x2, gw)
    if cfg.kind != "mma":
        raise ValueError(f"db_linear (triton): launch_mma16 runs mma configs, got {cfg.short()}; use run_config")
    check_config(cfg, gw.group_size)
    m, k = x2.shape
    n = gw.out_features
    if not mma_applies(x2, k, gw.group_size, cfg.block_k):
        return launch_matmul(x2, gw, bias, default_config(m, n, k, gw.group_size), wrap, out)
    out = _output(x2, n, out)
    if m == 0:
        return out
    bias, per_split, splits, dst = _split_target(x2, bias, out, cfg)
    xp = x2.view(torch.int32)
    tiles = cfg.block_n // (16 * cfg.num_warps)
    launch_mma16.last = _kernel(db_mma16_kernel, wrap)[(triton_cdiv(n, cfg.block_n), splits)](
        xp, gw.qweight, gw.scales, bias if bias is not None else gw.scales, dst,
        m, n, k, per_split if splits > 1 else 1,
        xp.stride(0) if m > 1 else 0, gw.qweight.stride(0), gw.scales.stride(0), dst.stride(-2),
        GROUP=gw.group_size, TILES=tiles, V=cfg.block_k // 64, NJ=1 if m <= 8 else 2, NWARPS=cfg.num_warps,
        HAS_BIAS=bias is not None and splits == 1, USE_ASM=not interpreted(),
        SPLIT_K=1 if splits == 1 else cfg.split_k, PREFETCH_X=prefetch_x, MASK_M=m % 8 != 0, L2PF=l2pf, STRIDED=strided,
        num_warps=cfg.num_warps, num_stages=1, **({"maxnreg": maxnreg} if maxnreg and not interpreted() else {}),
    )
    if splits > 1:
        launch_reduce(dst, bias, out, wrap)
    return out


launch_mma16.last = None
