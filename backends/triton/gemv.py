"""Batch-1 kernel of the packed dual-binary linear without tensor cores (fp16 activations).

At M = 1 the tensor-core kernel (:func:`~.kernels.db_matmul_kernel`) decodes every weight into
the register layout of ``wgmma``'s A operand: the code words go through shared memory to reach
that layout, each lane of a quad reads every word, and the MMA pads the single row of ``x`` to
16. It streams 23-50% of the copy bandwidth at M = 1 (``docs/kernels.md``). This kernel is the
plain matrix-vector form instead: each thread reads whole code words of its rows straight from
global memory and, per word (16 weights), runs one inline-PTX block:

    for each lane position q of the layout (shift sh(q) in {0, 2, 16, 18}):
        sel = (word >> sh(q)) & 0x3333                  # codes of elements 2q, 2q+1, 8+2q, 9+2q
        lo = prmt(lut_lo, sel); hi = prmt(lut_hi, sel)   # table lookup of the four levels
        p0 = prmt(lo, hi, 0x5140); p1 = prmt(lo, hi, 0x7362)  # two fp16 pairs of weights
        acc = fma.f16x2(p0, x pair q, acc); acc = fma.f16x2(p1, x pair 4+q, acc)
    partial = float(acc.lo) + float(acc.hi)

35 instructions per 16 weights (2.2 per weight), no shared memory, no barrier. ``x`` is read as
fp16 pairs (``int32``), the eight pairs of a word broadcast over the rows a thread holds. The
word's 16 products are summed in fp16 (two halves of eight), the partial in float32 from there
on: per element of ``y`` the extra rounding is that of 16 fp16 additions, about 7e-4 relative
to ``|y|`` for random data (the tensor-core kernel: 2e-4, its final rounding only); the tests
hold it to the same 2-ulp tolerance as the other kernels.

fp16 only: ``fma.rn.bf16x2`` would sum in bf16 (2^-8), too coarse; bf16 keeps the tensor-core
kernel. ``x`` must have an even K and 4-byte aligned rows (the launcher checks, and runs the
tensor-core kernel otherwise). Rows of ``x`` (M > 1) are a grid axis: each re-decodes the
weights, so only M = 1 gets this kernel from the tuner. ``SPLIT_K > 1`` as in the tensor-core
kernel: a float32 partial per split, summed by :func:`~.splitk.splitk_reduce_kernel`.

Loads (``LOADS``, chosen by :func:`~.launch._gemv_loads`). With ``tl.load`` (``LOADS=0``)
Triton vectorises the code words four per thread (one group of a row) and reads x in another
layout, one 4-byte load per pair, moving the pairs between threads with warp shuffles: on an
H100 that kept the L1 85% busy at 27% of the DRAM rate (Nsight Compute, 12,288 x 4,096).
``LOADS=2`` reads the code words, the two scales of a group (one ``int32``) and each word's
eight x pairs (two 16-byte vectors) in inline asm. Nothing then ties the tensors to a layout,
and Triton keeps its default one: each thread decodes one word position of every row of the
tile, so its x vector serves all ``BLOCK_N`` rows (L1 11% busy) and no value crosses threads
until the final sum. It needs K a multiple of 16 (whole code words; in a last, partial tile
the words past K get x = 0) and 16-byte aligned rows of x; otherwise ``LOADS=0``. ``LOADS=1``
(x only in asm, whole K tiles only) is kept for before/after timings.

Under the Triton interpreter (no inline asm) the same table lookup runs with integer ops and
the products are summed in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _group_luts, _lookup

__all__ = ["db_gemv_kernel"]

_WORD_DOT_ASM = tl.constexpr(
    "{ .reg .b32 s, a, b, p, r, acc; .reg .b16 h0, h1; .reg .f32 f0, f1; "
    # q = 0: elements 0, 1, 8, 9 -> x pairs 0 ($4) and 4 ($8)
    "and.b32 s, $1, 0x3333; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "mul.rn.f16x2 acc, p, $4; fma.rn.f16x2 acc, r, $8, acc; "
    # q = 1: elements 2, 3, 10, 11 -> x pairs 1 ($5) and 5 ($9)
    "shr.b32 s, $1, 2; and.b32 s, s, 0x3333; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $5, acc; fma.rn.f16x2 acc, r, $9, acc; "
    # q = 2: elements 4, 5, 12, 13 -> x pairs 2 ($6) and 6 ($10)
    "shr.b32 s, $1, 16; and.b32 s, s, 0x3333; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $6, acc; fma.rn.f16x2 acc, r, $10, acc; "
    # q = 3: elements 6, 7, 14, 15 -> x pairs 3 ($7) and 7 ($11)
    "shr.b32 s, $1, 18; and.b32 s, s, 0x3333; prmt.b32 a, $2, $2, s; prmt.b32 b, $3, $3, s; "
    "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
    "fma.rn.f16x2 acc, p, $7, acc; fma.rn.f16x2 acc, r, $11, acc; "
    "mov.b32 {h0, h1}, acc; cvt.f32.f16 f0, h0; cvt.f32.f16 f1, h1; add.f32 $0, f0, f1; }"
)  # a constexpr: jitted functions may read constexpr globals only


@triton.jit
def _word_dot(w, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM: tl.constexpr):
    """Per code word: ``sum_e weight(e) * x[e]`` over its 16 elements, float32.

    ``x0..x7``: the word's eight fp16 pairs of ``x`` as ``int32`` (pair j = elements 2j, 2j+1).
    """
    if USE_ASM:
        return tl.inline_asm_elementwise(
            _WORD_DOT_ASM, "=f,r,r,r,r,r,r,r,r,r,r,r",
            [w, lut_lo, lut_hi, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.float32, is_pure=True, pack=1)
    else:
        acc = _quad_dot(w, 0, lut_lo, lut_hi, x0, x4)
        acc += _quad_dot(w, 2, lut_lo, lut_hi, x1, x5)
        acc += _quad_dot(w, 16, lut_lo, lut_hi, x2, x6)
        acc += _quad_dot(w, 18, lut_lo, lut_hi, x3, x7)
        return acc


@triton.jit
def _quad_dot(w, SH: tl.constexpr, lut_lo, lut_hi, xa, xb):
    """Interpreter path: the four elements of lane position q (shift ``SH``) times their x, float32."""
    sel = (w >> SH) & 0x3333
    w00, w01, w10, w11 = _lookup(sel, lut_lo, lut_hi, False, False)
    return (w00.to(tl.float32) * _half(xa, 0) + w01.to(tl.float32) * _half(xa, 1)
            + w10.to(tl.float32) * _half(xb, 0) + w11.to(tl.float32) * _half(xb, 1))


@triton.jit
def _half(pair, HI: tl.constexpr):
    """fp16 number ``HI`` (0 = low half) of an ``int32`` fp16 pair, as float32."""
    return ((pair >> (16 * HI)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _ld_x_pairs(addr):
    """The eight fp16 pairs (``int32``) at each 16-byte aligned address of ``addr`` (int64): two vector loads."""
    return tl.inline_asm_elementwise(
        "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$8]; ld.global.nc.v4.b32 {$4, $5, $6, $7}, [$8+16];",
        "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr], dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@triton.jit
def _load_tile(qw_ptrs, sc_ptrs, x_ptrs, word, grp, k0, k_hi, k_pairs, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               X_VEC: tl.constexpr):
    """Code words, scales and the eight x pairs of each word of K tile ``k0`` (nothing read unless ``k0 < k_hi``).

    ``X_VEC``: x as two 16-byte vectors per word in inline asm (``LOADS=1``, module docstring).
    """
    ok = (word * 0 + k0) < k_hi  # [1, NGT, WPG] (a tensor: the interpreter rejects scalar masks)
    words = tl.load(qw_ptrs, mask=ok, other=0)
    ok_g = (grp * 0 + k0) < k_hi  # [1, NGT]
    a1 = tl.load(sc_ptrs, mask=ok_g, other=0.0)
    a2 = tl.load(sc_ptrs + 1, mask=ok_g, other=0.0)
    if EVEN_K and X_VEC:  # each thread's 8 pairs of a word as one 32-byte vector (two 16-byte loads)
        # an address past the split (the discarded prefetch of the last tile) is replaced by a valid one
        addr = tl.where(ok, x_ptrs, x_ptrs - k0 * (BLOCK_K // 2)).to(tl.int64, bitcast=True)
        x0, x1, x2, x3, x4, x5, x6, x7 = _ld_x_pairs(addr)
    elif EVEN_K:
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_pairs(x_ptrs, ok)
    else:  # pairs past K (its last word may be partly past it) are not read: 0 * garbage could be NaN
        p0 = k0 * (BLOCK_K // 2) + word * 8
        x0 = tl.load(x_ptrs, mask=ok & (p0 < k_pairs), other=0)
        x1 = tl.load(x_ptrs + 1, mask=ok & (p0 + 1 < k_pairs), other=0)
        x2 = tl.load(x_ptrs + 2, mask=ok & (p0 + 2 < k_pairs), other=0)
        x3 = tl.load(x_ptrs + 3, mask=ok & (p0 + 3 < k_pairs), other=0)
        x4 = tl.load(x_ptrs + 4, mask=ok & (p0 + 4 < k_pairs), other=0)
        x5 = tl.load(x_ptrs + 5, mask=ok & (p0 + 5 < k_pairs), other=0)
        x6 = tl.load(x_ptrs + 6, mask=ok & (p0 + 6 < k_pairs), other=0)
        x7 = tl.load(x_ptrs + 7, mask=ok & (p0 + 7 < k_pairs), other=0)
    return words, a1, a2, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_pairs(p, mask):
    """The eight x pairs (``int32``) at ``p .. p + 7`` with ``tl.load``, zero where ``mask`` is false."""
    return (tl.load(p, mask=mask, other=0), tl.load(p + 1, mask=mask, other=0), tl.load(p + 2, mask=mask, other=0),
            tl.load(p + 3, mask=mask, other=0), tl.load(p + 4, mask=mask, other=0),
            tl.load(p + 5, mask=mask, other=0), tl.load(p + 6, mask=mask, other=0),
            tl.load(p + 7, mask=mask, other=0))


@triton.jit
def _ld32(addr):
    """``int32`` at each address of ``addr`` (int64), read through the non-coherent path."""
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [addr], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _load_tile_asm(qw_ptrs, sc_ptrs, x_ptrs, word, grp, k0, k_hi, BLOCK_K: tl.constexpr, NGT: tl.constexpr,
                   COHERENT: tl.constexpr = False, EVEN_K: tl.constexpr = True, k_words=0):
    """:func:`_load_tile` with every load in inline asm (``LOADS=2``; K a multiple of 16).

    Nothing constrains the tensors' layout then, and Triton keeps its default one for the word
    tensor ``[BLOCK_N, NGT, WPG]``: each thread decodes one word position of every row of the
    tile, so its eight x pairs serve ``BLOCK_N`` rows (with ``tl.load`` of the words, Triton
    vectorises them four words per thread, and x serves two rows). Returns the two scales of
    a group as one ``int32`` (``a1`` low half) twice, in place of ``a1, a2``.
    """
    words, sc = _load_weights_asm(qw_ptrs, sc_ptrs, word, grp, k0, k_hi, BLOCK_K, NGT)
    x0, x1, x2, x3, x4, x5, x6, x7 = _load_x_asm(x_ptrs, word, k0, k_hi, BLOCK_K, COHERENT, EVEN_K, k_words)
    return words, sc, sc, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_weights_asm(qw_ptrs, sc_ptrs, word, grp, k0, k_hi, BLOCK_K: tl.constexpr, NGT: tl.constexpr):
    """Code words and packed scales of K tile ``k0`` (a tile past the split re-reads tile 0)."""
    ok = (word * 0 + k0) < k_hi
    ok_g = (grp * 0 + k0) < k_hi
    qa = tl.where(ok, qw_ptrs, qw_ptrs - k0 * (BLOCK_K // 16)).to(tl.int64, bitcast=True)
    sa = tl.where(ok_g, sc_ptrs, sc_ptrs - k0 * (NGT * 2)).to(tl.int64, bitcast=True)
    return _ld32(qa), _ld32(sa)


@triton.jit
def _load_x_asm(x_ptrs, word, k0, k_hi, BLOCK_K: tl.constexpr, COHERENT: tl.constexpr = False,
                EVEN_K: tl.constexpr = True, k_words=0):
    """The eight x pairs of each word of K tile ``k0`` (a tile past the split re-reads tile 0).

    ``COHERENT`` (with PDL): plain ``ld.global``, which ptxas keeps after ``griddepcontrol.wait``;
    it moves ``ld.global.nc`` (read-only for the kernel's lifetime) above the wait, where x may
    not be written yet.
    ``EVEN_K=False`` (K a multiple of 16 but not of the tile): words at or past ``k_words = K/16``
    read pair 0 of the row instead and get x = 0 (their code words, in the layout's padding, are
    0 too; 0 * x read past the row could be NaN).
    """
    ok = (word * 0 + k0) < k_hi
    xa = tl.where(ok, x_ptrs, x_ptrs - k0 * (BLOCK_K // 2))
    if not EVEN_K:
        real = (k0 * (BLOCK_K // 16) + word) < k_words
        xa = tl.where(real, xa, x_ptrs - k0 * (BLOCK_K // 2) - word * 8)
    xa = xa.to(tl.int64, bitcast=True)
    if COHERENT:
        x0, x1, x2, x3, x4, x5, x6, x7 = tl.inline_asm_elementwise(
            "ld.global.v4.b32 {$0, $1, $2, $3}, [$8]; ld.global.v4.b32 {$4, $5, $6, $7}, [$8+16];",
            "=r,=r,=r,=r,=r,=r,=r,=r,l", [xa], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _ld_x_pairs(xa)
    if not EVEN_K:
        x0, x1, x2, x3, x4, x5, x6, x7 = _zero_unless(real, x0, x1, x2, x3, x4, x5, x6, x7)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _zero_unless(real, x0, x1, x2, x3, x4, x5, x6, x7):
    """A word's eight x pairs, zero where ``real`` is false."""
    return (tl.where(real, x0, 0), tl.where(real, x1, 0), tl.where(real, x2, 0), tl.where(real, x3, 0),
            tl.where(real, x4, 0), tl.where(real, x5, 0), tl.where(real, x6, 0), tl.where(real, x7, 0))


@triton.jit
def _prefetch_l2(addr):
    """``prefetch.global.L2`` of each address (a side effect: ptxas keeps it before a later
    ``griddepcontrol.wait``)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _packed_luts(sc):
    """:func:`~.kernels._group_luts` (fp16, asm) from both scales packed in one ``int32``."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 a, b, s, z; .reg .b32 q; mov.b32 {a, b}, $2; add.rn.f16 s, a, b; mov.b16 z, 0; "
        "mov.b32 q, {s, z}; prmt.b32 $0, $2, q, 0x4206; prmt.b32 $1, $2, q, 0x5317; }",
        "=r,=r,r", [sc], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def db_gemv_kernel(
    x_ptr,  # int32 view of fp16 activations [M, K/2] (fp16 pairs; row stride stride_xm pairs)
    qw_ptr,  # int32 [N, K_alloc/16] GPU-layout codes (row stride stride_qn words)
    sc_ptr,  # fp16 [N, K_alloc/G, 2] scales (row stride stride_sn)
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N] fp16 (row stride stride_om); with SPLIT_K > 1 a float32 workspace [splits, M, N]
    M, N, K,
    TILES_PER_SPLIT,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    LOADS: tl.constexpr = 0, PDL: tl.constexpr = False, GLU: tl.constexpr = False,
):
    """``out[m, n-block]`` for one row ``m = program_id(2)`` of x; grid ``(cdiv(N, BLOCK_N), splits, M)``.

    ``GLU`` (``SPLIT_K == 1`` only): the weight rows are ``[gate; up]`` (``N = 2H``) and the
    output ``[M, H]`` is ``silu(gate) * up``; grid ``(cdiv(H, BLOCK_N // 2), 1, M)``. Slot ``i``
    of a program's ``BLOCK_N`` rows holds gate row ``o`` (``i`` even) or up row ``o`` (``i``
    odd), ``o = pid * BLOCK_N / 2 + i // 2``, so the epilogue pairs them with a reshape.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(2).to(tl.int64)
    NGT: tl.constexpr = BLOCK_K // GROUP
    WPG: tl.constexpr = GROUP // 16
    NW: tl.constexpr = BLOCK_K // 16
    if GLU:
        slot = tl.arange(0, BLOCK_N)
        half = N // 2
        offs_n = pid_n * (BLOCK_N // 2) + slot // 2  # output feature of each slot
        rows_n = tl.minimum(offs_n, half - 1) + (slot % 2) * half  # gate row, or the up row after it
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped: loads need no mask, the store is masked
    grp = tl.arange(0, NGT)[None, :, None]
    wig = tl.arange(0, WPG)[None, None, :]
    word = grp * WPG + wig  # [1, NGT, WPG] word index within the tile
    qw_ptrs = qw_ptr + rows_n[:, None, None].to(tl.int64) * stride_qn + word
    grp_row = tl.arange(0, NGT)[None, :]  # [1, NGT] group index within the tile
    sc_ptrs = sc_ptr + rows_n[:, None].to(tl.int64) * stride_sn + grp_row * 2
    x_ptrs = x_ptr + m * stride_xm + word * 8  # pair 0 of each word; pair j at + j
    k_pairs = K // 2
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = tl.cdiv(K, BLOCK_K)
    else:
        pid_k = tl.program_id(1)
        k_lo = pid_k * TILES_PER_SPLIT
        k_hi = tl.minimum(k_lo + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
        qw_ptrs += k_lo * NW
        sc_ptrs += k_lo * (NGT * 2)
        x_ptrs += k_lo * (BLOCK_K // 2)
        out_ptr += pid_k.to(tl.int64) * M * N

    acc = tl.zeros((BLOCK_N, NGT, WPG), dtype=tl.float32)
    # software pipelining by hand (Triton pipelines loads that feed a dot only): the loads of
    # tile k0 + 1 are issued before tile k0 is decoded; the last tile is decoded after the loop
    # PDL (programmatic dependent launch, LOADS=2 only): the weights do not depend on the kernel
    # before this one, so the first tile's are requested (and the second's prefetched to L2)
    # before waiting for that kernel (griddepcontrol.wait); x is read after the wait, with
    # coherent loads (ptxas moves ld.global.nc above the wait)
    if LOADS == 2:
        if PDL:  # the prefetch of the second tile also keeps ptxas from hoisting the wait to the top
            nxt = tl.where((word * 0 + k_lo + 1) < k_hi, qw_ptrs + NW, qw_ptrs)
            _prefetch_l2(nxt.to(tl.int64, bitcast=True))
            tl.extra.cuda.gdc_wait()
        words, a1 = _load_weights_asm(qw_ptrs, sc_ptrs, word, grp_row, k_lo, k_hi, BLOCK_K, NGT)
        a2 = a1
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_x_asm(x_ptrs, word, k_lo, k_hi, BLOCK_K, PDL, EVEN_K, K // 16)
    else:  # (PDL runs with LOADS=2 only, launch._gemv_pdl)
        words, a1, a2, x0, x1, x2, x3, x4, x5, x6, x7 = _load_tile(
            qw_ptrs, sc_ptrs, x_ptrs, word, grp_row, k_lo, k_hi, k_pairs, BLOCK_K, EVEN_K, LOADS == 1)
    if PDL:  # the next kernel may start launching (it waits for this grid before reading)
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_lo, k_hi - 1):  # the last tile is decoded after the loop: nothing is read past it
        qw_ptrs += NW
        sc_ptrs += NGT * 2
        x_ptrs += BLOCK_K // 2
        if LOADS == 2:
            nwords, na1, na2, nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7 = _load_tile_asm(
                qw_ptrs, sc_ptrs, x_ptrs, word, grp_row, k0 + 1, k_hi, BLOCK_K, NGT, PDL, EVEN_K, K // 16)
            lut_lo, lut_hi = _packed_luts(a1)
        else:
            nwords, na1, na2, nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7 = _load_tile(
                qw_ptrs, sc_ptrs, x_ptrs, word, grp_row, k0 + 1, k_hi, k_pairs, BLOCK_K, EVEN_K, LOADS == 1)
            lut_lo, lut_hi = _group_luts(a1, a2, False, USE_ASM)
        acc += _word_dot(words, lut_lo[:, :, None], lut_hi[:, :, None], x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM)
        words, a1, a2, x0, x1, x2, x3, x4, x5, x6, x7 = nwords, na1, na2, nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7
    if k_hi > k_lo:  # (an empty split's first "tile" is tile 0 re-read with asm loads: not decoded)
        if LOADS == 2:
            lut_lo, lut_hi = _packed_luts(a1)
        else:
            lut_lo, lut_hi = _group_luts(a1, a2, False, USE_ASM)
        acc += _word_dot(words, lut_lo[:, :, None], lut_hi[:, :, None], x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM)

    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n).to(tl.float32)
    if GLU:  # the gate (even slots) and up (odd slots) of each output feature, paired
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        z = gate / (1.0 + tl.exp(-gate)) * up
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + m * stride_om + offs_o, z.to(out_ptr.dtype.element_ty), mask=offs_o < N // 2)
    else:
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)
