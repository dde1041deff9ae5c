"""Batch-1 gemv reading whole groups per thread: one 16-byte load of four code words per row.

The word gemv (:mod:`.gemv`, ``LOADS=2``) gives each thread one code word (16 weights) of every
row of its tile: per word it computes a 64-bit address and issues a 4-byte load for the code
word and another for the scales of its group, and builds the group's level table again (the
four words of a group sit in four threads). On the H100 that is about 56 instructions per word
in the main loop for 35 of decoding (kernels.md, "Loads in inline asm"), and at batch 1 the
kernel issues about as many instructions as the SMs can (results.md section 5). This kernel
is the same product with a *chunk* (``WPC = min(4, G/16)`` consecutive code words, one group
for ``G >= 64``) as the unit of a thread:

- per row and chunk: one ``ld.global.nc.v4.b32`` of the four code words, one 4-byte load of
  the group's two scales, one level table (:func:`~.gemv._packed_luts`);
- per chunk: the 32 fp16 pairs of ``x`` in eight 16-byte loads from one address (the offsets
  are immediates in the asm), broadcast over the rows the thread holds;
- per word (:data:`_WORD_H2_ASM`): the four selectors from two masks (``prmt`` reads only the
  low 16 bits of its selector: ``w & 0x33333333`` serves lane positions 0 and 2 (``>> 16``),
  ``(w >> 2) & 0x33333333`` positions 1 and 3), the table lookups and the eight ``f16x2``
  multiply-adds: 29 instructions;
- ``SUM16`` words are summed in ``f16x2`` before one conversion to float32 (1: each word's
  sum converted, the word gemv's numerics; 2 or 4: fewer conversions, longer fp16 sums).

Everything else is the word gemv: register double buffering of the next K tile, split-K with
float32 partials, bias, the GLU epilogue, the interpreter path (plain loads, float32 sums).
Needs fp16 activations, K a multiple of 16 and 16-byte aligned rows of x for the asm loads
(the launcher checks, :func:`~.launch.launch_gemv`).

Layout: the chunk tensor ``[BLOCK_N, NC]`` (``NC = BLOCK_K / (16 WPC)``) keeps Triton's default
blocked layout (lanes along chunks first); ``x`` is loaded as ``[1, NC]`` in the same layout, so
its broadcast over the rows is free when ``NC >= 32 * num_warps`` and costs a duplicate (L1-hit)
load per extra lane row otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemv import _ld32, _load_pairs, _packed_luts, _word_dot, _zero_unless
from .kernels import _group_luts

__all__ = ["db_gemv_chunk_kernel"]

_WORD_H2_ASM = tl.constexpr(
    "{ .reg .b32 m, n, s, a, b, p, r, acc; "
    "and.b32 m, $1, 0x33333333; shr.b32 n, $1, 2; and.b32 n, n, 0x33333333; "
    # q = 0 (selector m): elements 0, 1, 8, 9 -> x pairs 0 ($4) and 4 ($8)
    "prmt.b32 a, $2, $2, m; prmt.b32 b, $3, $3, m; prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "mul.rn.f16x2 acc, p, $4; fma.rn.f16x2 acc, r, $8, acc; "
    # q = 1 (selector n): elements 2, 3, 10, 11 -> pairs 1 ($5) and 5 ($9)
    "prmt.b32 a, $2, $2, n; prmt.b32 b, $3, $3, n; prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $5, acc; fma.rn.f16x2 acc, r, $9, acc; "
    # q = 2 (selector m >> 16): elements 4, 5, 12, 13 -> pairs 2 ($6) and 6 ($10)
    "shr.b32 s, m, 16; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $6, acc; fma.rn.f16x2 acc, r, $10, acc; "
    # q = 3 (selector n >> 16): elements 6, 7, 14, 15 -> pairs 3 ($7) and 7 ($11)
    "shr.b32 s, n, 16; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $7, acc; fma.rn.f16x2 acc, r, $11, acc; "
    "mov.b32 $0, acc; }"
)


@triton.jit
def _word_h2(w, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7):
    """The word's 16 products summed as an ``f16x2`` pair (``int32``; asm only)."""
    return tl.inline_asm_elementwise(
        _WORD_H2_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r",
        [w, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _h2_to_f32(h):
    """Both halves of an ``f16x2`` pair, summed in float32."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 h0, h1; .reg .f32 f0, f1; mov.b32 {h0, h1}, $1; cvt.f32.f16 f0, h0; cvt.f32.f16 f1, h1; "
        "add.f32 $0, f0, f1; }", "=f,r", [h], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _h2_add(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _ld_words(addr, WPC: tl.constexpr):
    """``WPC`` (1, 2 or 4) consecutive code words at each 16-byte (4 words) aligned address."""
    if WPC == 4:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [addr],
            dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    elif WPC == 2:
        w0, w1 = tl.inline_asm_elementwise(
            "ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [addr], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
        w2 = w0
        w3 = w0
    else:
        w0 = _ld32(addr)
        w1 = w0
        w2 = w0
        w3 = w0
    return w0, w1, w2, w3


@triton.jit
def _ld_x_word(addr, J: tl.constexpr, COHERENT: tl.constexpr):
    """The eight fp16 pairs of word ``J`` of the chunk whose x starts at each 16-byte aligned ``addr``.

    ``COHERENT`` (PDL): plain ``ld.global``, which ptxas keeps after ``griddepcontrol.wait``
    (``ld.global.nc`` may move above it, before x is written; as in :mod:`.gemv`).
    """
    if COHERENT:
        ld: tl.constexpr = "ld.global.v4.b32 "
    else:
        ld: tl.constexpr = "ld.global.nc.v4.b32 "
    if J == 0:
        lo: tl.constexpr = "[$8]; "
        hi: tl.constexpr = "[$8+16];"
    elif J == 1:
        lo: tl.constexpr = "[$8+32]; "
        hi: tl.constexpr = "[$8+48];"
    elif J == 2:
        lo: tl.constexpr = "[$8+64]; "
        hi: tl.constexpr = "[$8+80];"
    else:
        lo: tl.constexpr = "[$8+96]; "
        hi: tl.constexpr = "[$8+112];"
    return tl.inline_asm_elementwise(ld + "{$0, $1, $2, $3}, " + lo + ld + "{$4, $5, $6, $7}, " + hi,
                                     "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr], dtype=(tl.int32,) * 8, is_pure=True,
                                     pack=1)


@triton.jit
def _x_word(x_ptrs, J: tl.constexpr, real, MASKED: tl.constexpr, USE_ASM: tl.constexpr, COHERENT: tl.constexpr):
    """Word ``J``'s eight x pairs (``int32``); with ``MASKED``, zero where ``real`` is false (asm:
    ``x_ptrs`` already points at a readable chunk there)."""
    if USE_ASM:
        x0, x1, x2, x3, x4, x5, x6, x7 = _ld_x_word(x_ptrs.to(tl.int64, bitcast=True), J, COHERENT)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_pairs(x_ptrs + J * 8, real)
    if USE_ASM and MASKED:
        x0, x1, x2, x3, x4, x5, x6, x7 = _zero_unless(real, x0, x1, x2, x3, x4, x5, x6, x7)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _chunk_dot(words, x, lut_lo, lut_hi, J: tl.constexpr, USE_ASM: tl.constexpr):
    """Word ``J``: ``f16x2`` sum (asm) or float32 sum (interpreter)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = x
    if USE_ASM:
        return _word_h2(words, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7)
    else:
        return _word_dot(words, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7, False)


@triton.jit
def _chunk_sum(d0, d1, d2, d3, WPC: tl.constexpr, SUM16: tl.constexpr, USE_ASM: tl.constexpr):
    """float32 sum of a chunk's ``WPC`` word sums (``f16x2`` pairs with asm, ``SUM16`` of them added in fp16)."""
    if not USE_ASM:
        s = d0
        if WPC >= 2:
            s += d1
        if WPC == 4:
            s += d2 + d3
        return s
    if WPC == 1:
        return _h2_to_f32(d0)
    elif WPC == 2:
        if SUM16 >= 2:
            return _h2_to_f32(_h2_add(d0, d1))
        else:
            return _h2_to_f32(d0) + _h2_to_f32(d1)
    else:
        if SUM16 == 4:
            return _h2_to_f32(_h2_add(_h2_add(d0, d1), _h2_add(d2, d3)))
        elif SUM16 == 2:
            return _h2_to_f32(_h2_add(d0, d1)) + _h2_to_f32(_h2_add(d2, d3))
        else:
            return (_h2_to_f32(d0) + _h2_to_f32(d1)) + (_h2_to_f32(d2) + _h2_to_f32(d3))


@triton.jit
def _load_weights(qw_ptrs, sc_ptrs, ok, WPC: tl.constexpr, USE_ASM: tl.constexpr):
    """Code words and scales of the chunks of one tile (asm: packed scales twice; else ``a1, a2``)."""
    if USE_ASM:
        w0, w1, w2, w3 = _ld_words(qw_ptrs.to(tl.int64, bitcast=True), WPC)
        sc = _ld32(sc_ptrs.to(tl.int64, bitcast=True))
        return w0, w1, w2, w3, sc, sc
    else:
        w0 = tl.load(qw_ptrs, mask=ok, other=0)
        w1 = w0
        w2 = w0
        w3 = w0
        if WPC >= 2:
            w1 = tl.load(qw_ptrs + 1, mask=ok, other=0)
        if WPC == 4:
            w2 = tl.load(qw_ptrs + 2, mask=ok, other=0)
            w3 = tl.load(qw_ptrs + 3, mask=ok, other=0)
        a1 = tl.load(sc_ptrs, mask=ok, other=0.0)
        a2 = tl.load(sc_ptrs + 1, mask=ok, other=0.0)
        return w0, w1, w2, w3, a1, a2


@triton.jit
def _load_x(x_base, word0, t, k_words, WPC: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
            USE_ASM: tl.constexpr, COHERENT: tl.constexpr):
    """x pairs of the chunks of tile ``t`` (``x_base``: pair 0 of each chunk in tile 0 of the split;
    ``word0``: the chunks' first word index in that tile, ``[1, NC]``)."""
    w_first = t * (BLOCK_K // 16) + word0  # absolute index of each chunk's first word
    if EVEN_K:
        real0 = w_first >= 0
        real1 = real0
        real2 = real0
        real3 = real0
        ptrs = x_base + t * (BLOCK_K // 2)
    else:
        real0 = w_first < k_words
        real1 = (w_first + 1) < k_words
        real2 = (w_first + 2) < k_words
        real3 = (w_first + 3) < k_words
        ptrs = tl.where(real0, x_base + t * (BLOCK_K // 2), x_base - word0 * 8)  # pair 0 of the row: readable
    xa = _x_word(ptrs, 0, real0, not EVEN_K, USE_ASM, COHERENT)
    if WPC >= 2:
        xb = _x_word(ptrs, 1, real1, not EVEN_K, USE_ASM, COHERENT)
    else:
        xb = xa
    if WPC == 4:
        xc = _x_word(ptrs, 2, real2, not EVEN_K, USE_ASM, COHERENT)
        xd = _x_word(ptrs, 3, real3, not EVEN_K, USE_ASM, COHERENT)
    else:
        xc = xa
        xd = xa
    return xa, xb, xc, xd


@triton.jit
def _tile_dot(w0, w1, w2, w3, a1, a2, xa, xb, xc, xd, WPC: tl.constexpr, SUM16: tl.constexpr,
              USE_ASM: tl.constexpr):
    """float32 ``[BLOCK_N, NC]``: each chunk's products with x, summed."""
    if USE_ASM:
        lut_lo, lut_hi = _packed_luts(a1)
    else:
        lut_lo, lut_hi = _group_luts(a1, a2, False, False)
    d0 = _chunk_dot(w0, xa, lut_lo, lut_hi, 0, USE_ASM)
    d1 = d0
    d2 = d0
    d3 = d0
    if WPC >= 2:
        d1 = _chunk_dot(w1, xb, lut_lo, lut_hi, 1, USE_ASM)
    if WPC == 4:
        d2 = _chunk_dot(w2, xc, lut_lo, lut_hi, 2, USE_ASM)
        d3 = _chunk_dot(w3, xd, lut_lo, lut_hi, 3, USE_ASM)
    return _chunk_sum(d0, d1, d2, d3, WPC, SUM16, USE_ASM)


@triton.jit
def db_gemv_chunk_kernel(
    x_ptr,  # int32 view of fp16 activations [M, K/2] (row stride stride_xm pairs)
    qw_ptr,  # int32 [N, K_alloc/16] GPU-layout codes (row stride stride_qn words)
    sc_ptr,  # fp16 [N, K_alloc/G, 2] scales (row stride stride_sn)
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N]; with SPLIT_K > 1 a float32 workspace [splits, M, N]
    M, N, K,
    TILES_PER_SPLIT,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    GLU: tl.constexpr = False, SUM16: tl.constexpr = 1, PREFETCH_X: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """``out[m, n-block]`` for row ``m = program_id(2)``; grid ``(cdiv(N, BLOCK_N), splits, M)``
    (GLU: ``(cdiv(N/2, BLOCK_N/2), 1, M)``, rows as in :func:`~.gemv.db_gemv_kernel`).

    ``PREFETCH_X=True`` reads a tile's x one tile ahead, with its code words, instead of when the
    tile is decoded (32 registers more per chunk column; x is an L2/L1 hit after the first
    program). The default, False, was faster on 6 of the 7 shapes of the H100 sweep (kernels.md).
    ``PDL`` (programmatic dependent launch): the first tile's code words and scales are requested
    before ``griddepcontrol.wait`` (they do not depend on the kernel before), x after it with
    coherent loads; dependents may launch once the first tile is requested.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(2).to(tl.int64)
    WPC: tl.constexpr = 4 if GROUP >= 64 else GROUP // 16
    CHUNK: tl.constexpr = 16 * WPC
    NC: tl.constexpr = BLOCK_K // CHUNK
    if GLU:
        slot = tl.arange(0, BLOCK_N)
        half = N // 2
        offs_n = pid_n * (BLOCK_N // 2) + slot // 2
        rows_n = tl.minimum(offs_n, half - 1) + (slot % 2) * half
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped: loads need no mask, the store is masked
    chunk = tl.arange(0, NC)[None, :]  # [1, NC]
    word0 = chunk * WPC  # first word of each chunk within a tile
    rows = rows_n[:, None].to(tl.int64)
    k_words = K // 16
    last_chunk = (K - 1) // CHUNK  # chunks at or past the end of K re-read this one (x = 0 there)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = tl.cdiv(K, BLOCK_K)
    else:
        pid_k = tl.program_id(1)
        k_lo = pid_k * TILES_PER_SPLIT
        k_hi = tl.minimum(k_lo + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
        out_ptr += pid_k.to(tl.int64) * M * N
    x_base = x_ptr + m * stride_xm + word0 * 8  # pair 0 of each chunk in tile 0

    acc = tl.zeros((BLOCK_N, NC), dtype=tl.float32)
    # tile t's chunk c: absolute chunk t * NC + c, clamped to the last real one (EVEN_K: never needed)
    t = k_lo
    cidx = t * NC + chunk
    if not EVEN_K:
        cidx = tl.minimum(cidx, last_chunk)
    qw_ptrs = qw_ptr + rows * stride_qn + cidx * WPC
    sc_ptrs = sc_ptr + rows * stride_sn + (cidx * CHUNK // GROUP) * 2
    w0, w1, w2, w3, a1, a2 = _load_weights(qw_ptrs, sc_ptrs, cidx * 0 + t < k_hi, WPC, USE_ASM)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH_X:
        xa, xb, xc, xd = _load_x(x_base, word0, t, k_words, WPC, BLOCK_K, EVEN_K, USE_ASM, PDL)
    for t in range(k_lo, k_hi - 1):  # the last tile is decoded after the loop
        cidx = (t + 1) * NC + chunk
        if not EVEN_K:
            cidx = tl.minimum(cidx, last_chunk)
        qw_ptrs = qw_ptr + rows * stride_qn + cidx * WPC
        sc_ptrs = sc_ptr + rows * stride_sn + (cidx * CHUNK // GROUP) * 2
        n0, n1, n2, n3, na1, na2 = _load_weights(qw_ptrs, sc_ptrs, cidx * 0 + t + 1 < k_hi, WPC, USE_ASM)
        if PREFETCH_X:
            nxa, nxb, nxc, nxd = _load_x(x_base, word0, t + 1, k_words, WPC, BLOCK_K, EVEN_K, USE_ASM, PDL)
        else:
            xa, xb, xc, xd = _load_x(x_base, word0, t, k_words, WPC, BLOCK_K, EVEN_K, USE_ASM, PDL)
        acc += _tile_dot(w0, w1, w2, w3, a1, a2, xa, xb, xc, xd, WPC, SUM16, USE_ASM)
        w0, w1, w2, w3, a1, a2 = n0, n1, n2, n3, na1, na2
        if PREFETCH_X:
            xa, xb, xc, xd = nxa, nxb, nxc, nxd
    if k_hi > k_lo:
        if not PREFETCH_X:
            xa, xb, xc, xd = _load_x(x_base, word0, k_hi - 1, k_words, WPC, BLOCK_K, EVEN_K, USE_ASM, PDL)
        acc += _tile_dot(w0, w1, w2, w3, a1, a2, xa, xb, xc, xd, WPC, SUM16, USE_ASM)

    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n).to(tl.float32)
    if GLU:
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        z = gate / (1.0 + tl.exp(-gate)) * up
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + m * stride_om + offs_o, z.to(out_ptr.dtype.element_ty), mask=offs_o < N // 2)
    else:
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)
