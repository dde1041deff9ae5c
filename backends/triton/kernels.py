"""Triton kernels of the packed dual-binary linear (GPU layout of :mod:`.layout`).

``y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]``,
``w[n, k] = a1[n, k // G] * b1[n, k] + a2[n, k // G] * b2[n, k]`` computed in the activation
dtype (the two products are exact since b is 0 or 1; the sum is rounded once), accumulated in
float32 by the tensor cores, rounded to the activation dtype at the end.

Two kernels:

- :func:`db_matmul_kernel` computes ``out^T = W @ x^T`` tile by tile: a ``[BLOCK_N, BLOCK_K]``
  weight tile is decoded in registers straight into the layout of the dot's A operand
  (Hopper ``wgmma`` reads A from registers), ``x^T`` is the B operand (``SWAP=True``: the other
  orientation, ``x @ W^T``, with the decoded tile going through shared memory). One kernel
  serves decode (``BLOCK_M = 16``, the minimum of ``tl.dot``; rows of x past M are masked, so
  at M = 1 only one row is read; small ``BLOCK_N`` so that ``cdiv(N, BLOCK_N)`` programs cover
  every SM, each streaming whole rows of K) and prefill (``BLOCK_M`` 64-256, grouped tile order
  for L2 reuse). Weight rows past N are clamped to row N-1 (loads need no mask; the store is).
  ``SPLIT_K > 1`` (decode) adds a grid axis over K: each program covers a whole number of
  ``BLOCK_K`` tiles of K and writes a float32 partial, summed by the reduce kernel of
  :mod:`.splitk`.
- :func:`db_dequant_kernel` writes the dense ``[N, K]`` weight in the activation dtype, for the
  large-M path "dequantize, then cuBLAS".

Decoding (see :mod:`.layout`): per row and group a 4-entry table of the levels
{0, a1, a2, a1+a2} is built as two byte-planar registers; per word and lane,
``sel = (word >> sh(q)) & 0x3333`` and four byte permutes (``prmt``) give four finished weights
in the tensor-core operand layout. ``USE_ASM`` emits the ``prmt`` as inline PTX (GPU); under the
Triton interpreter, which has no inline asm, the same table lookup is done with integer ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["db_matmul_kernel", "db_dequant_kernel"]


@triton.jit
def _group_luts(a1, a2, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """Scales ``[R, NG]`` -> the two byte-planar LUT registers of the levels {0, a1, a2, a1+a2}.

    ``lut_lo`` holds the low bytes of levels 0..3 (byte c = low byte of level c), ``lut_hi``
    their high bytes. ``a1 + a2`` is rounded once to the activation dtype.
    """
    if USE_ASM:
        if IS_BF16:
            add: tl.constexpr = "add.rn.bf16"
        else:
            add: tl.constexpr = "add.rn.f16"
        lut_lo, lut_hi = tl.inline_asm_elementwise(
            "{ .reg .b16 s, z; .reg .b32 p, q; " + add + " s, $2, $3; mov.b16 z, 0; "
            "mov.b32 p, {$2, $3}; mov.b32 q, {s, z}; prmt.b32 $0, p, q, 0x4206; prmt.b32 $1, p, q, 0x5317; }",
            "=r,=r,h,h", [a1, a2], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        b1 = a1.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b2 = a2.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b3 = (a1 + a2).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lut_lo = ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | ((b3 & 0xFF) << 24)
        lut_hi = (b1 & 0xFF00) | ((b2 & 0xFF00) << 8) | ((b3 & 0xFF00) << 16)
    return lut_lo, lut_hi


@triton.jit
def _lookup(sel, lut_lo, lut_hi, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """Selectors ``[..., 4]`` (one per lane quad position q) -> 4 weights each: (slot, h) = 00, 01, 10, 11.

    ``sel`` has the codes of elements ``2q, 2q+1, 2q+8, 2q+9`` of a word in its nibbles 0..3
    (values 0..3). ``prmt(lut_lo, sel)`` gathers their low bytes, ``prmt(lut_hi, sel)`` their
    high bytes, and two more ``prmt`` interleave them into the two 16-bit float pairs.
    """
    if USE_ASM:
        asm: tl.constexpr = ("{ .reg .b32 a, b, p, r; prmt.b32 a, $4, $4, $6; prmt.b32 b, $5, $5, $6; "
                             "prmt.b32 p, a, b, 0x5140; prmt.b32 r, a, b, 0x7362; "
                             "mov.b32 {$0, $1}, p; mov.b32 {$2, $3}, r; }")
        if IS_BF16:
            w00, w01, w10, w11 = tl.inline_asm_elementwise(
                asm, "=h,=h,=h,=h,r,r,r", [lut_lo, lut_hi, sel],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            w00, w01, w10, w11 = tl.inline_asm_elementwise(
                asm, "=h,=h,=h,=h,r,r,r", [lut_lo, lut_hi, sel],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        w00 = _lut_half(sel, lut_lo, lut_hi, 0, IS_BF16)
        w01 = _lut_half(sel, lut_lo, lut_hi, 1, IS_BF16)
        w10 = _lut_half(sel, lut_lo, lut_hi, 2, IS_BF16)
        w11 = _lut_half(sel, lut_lo, lut_hi, 3, IS_BF16)
    return w00, w01, w10, w11


@triton.jit
def _lut_half(sel, lut_lo, lut_hi, NIB: tl.constexpr, IS_BF16: tl.constexpr):
    """Interpreter path of :func:`_lookup`: the 16-bit float chosen by nibble ``NIB`` of ``sel``."""
    c = (sel >> (4 * NIB)) & 3
    bits = ((lut_lo >> (8 * c)) & 0xFF) | (((lut_hi >> (8 * c)) & 0xFF) << 8)
    if IS_BF16:
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _decode_words(w, lut_lo, lut_hi, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """Code words ``[R, NG, WPG]`` + LUTs ``[R, NG]`` -> weights ``[R, NG, WPG, 16]`` in element order.

    Element ``e = 8*slot + 2*q + h`` of a word has its code at bit ``sh(q) + 4*(2*slot + h)``,
    ``sh(q) = 2*(q % 2) + 16*(q // 2)``, so ``(word >> sh(q)) & 0x3333`` is the selector of the
    four elements that one lane of a quad holds in the tensor-core operand layout.
    """
    R: tl.constexpr = w.shape[0]
    NG: tl.constexpr = w.shape[1]
    WPG: tl.constexpr = w.shape[2]
    q = tl.arange(0, 4)[None, None, None, :]
    sh = 2 * (q % 2) + 16 * (q // 2)
    sel = (w[:, :, :, None] >> sh) & 0x3333
    w00, w01, w10, w11 = _lookup(sel, lut_lo[:, :, None, None], lut_hi[:, :, None, None], IS_BF16, USE_ASM)
    both = tl.join(tl.join(w00, w01), tl.join(w10, w11))  # [R, NG, WPG, q, h, slot]
    both = tl.permute(both, (0, 1, 2, 5, 3, 4))  # [R, NG, WPG, slot, q, h]
    return tl.reshape(both, (R, NG, WPG, 16))


@triton.jit
def _dequant_tile(words, sc, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                  IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """``words int32 [ROWS, BLOCK_K/16]``, ``sc [ROWS, BLOCK_K/G, 2]`` -> weight ``[ROWS, BLOCK_K]``."""
    NGT: tl.constexpr = BLOCK_K // GROUP
    WPG: tl.constexpr = GROUP // 16
    a1, a2 = tl.split(sc)
    lut_lo, lut_hi = _group_luts(a1, a2, IS_BF16, USE_ASM)
    w = _decode_words(tl.reshape(words, (ROWS, NGT, WPG)), lut_lo, lut_hi, IS_BF16, USE_ASM)
    return tl.reshape(w, (ROWS, BLOCK_K))


@triton.jit
def db_matmul_kernel(
    # pointers
    x_ptr,  # [M, K] activations (row stride stride_xm, unit stride along K)
    qw_ptr,  # int32 [N, K_alloc/16] GPU-layout codes (row stride stride_qn words)
    sc_ptr,  # [N, K_alloc/G, 2] scales in the activation dtype (row stride stride_sn)
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N] (row stride stride_om)
    # sizes
    M, N, K,
    TILES_PER_SPLIT,  # BLOCK_K tiles per K split (read only when SPLIT_K > 1)
    # strides, in elements
    stride_xm, stride_qn, stride_sn, stride_om,
    # meta-parameters
    GROUP: tl.constexpr,  # G
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K: multiple of G, divides 1024
    GROUP_TILES: tl.constexpr,  # tile-order grouping along N for L2 reuse (1 = none)
    SWAP: tl.constexpr,  # False: out^T = W @ x^T (W is the register A operand); True: out = x @ W^T
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks on x
    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,  # 1: whole K per program; > 1: K split along grid axis 1 (below)
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile per program (see module docstring).

    ``SPLIT_K = 1``: the program covers the whole K and writes ``out`` (bias added, cast).
    ``SPLIT_K > 1``: program ``(tile, s)`` (``s = program_id(1)``) covers the K tiles
    ``[s * TILES_PER_SPLIT, (s + 1) * TILES_PER_SPLIT)`` cut at the last tile with real features
    and writes its float32 partial to ``out_ptr + s * M * N``, a workspace ``[splits, M, N]``
    (row stride ``stride_om = N``; the launcher passes ``HAS_BIAS=False``); a split past the real
    K stores zeros. :func:`~.splitk.splitk_reduce_kernel` sums the partials.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # grouped order: GROUP_TILES consecutive N tiles sweep all M tiles before moving on
    per_group = GROUP_TILES * num_m
    first_n = (pid // per_group) * GROUP_TILES
    size_n = tl.minimum(num_n - first_n, GROUP_TILES)
    pid_n = first_n + (pid % per_group) % size_n
    pid_m = (pid % per_group) // size_n

    NW: tl.constexpr = BLOCK_K // 16
    NGT: tl.constexpr = BLOCK_K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.minimum(offs_n, N - 1)  # clamped: weight loads need no mask, the store is masked
    m_ok = offs_m < M  # rows of x past M are not read (at M = 1 that saves 15/16 of the x traffic)
    rows_m = tl.minimum(offs_m, M - 1)
    offs_k = tl.arange(0, BLOCK_K)
    pair = tl.arange(0, 2)
    qw_ptrs = qw_ptr + rows_n[:, None].to(tl.int64) * stride_qn + tl.arange(0, NW)[None, :]
    sc_ptrs = sc_ptr + rows_n[:, None, None].to(tl.int64) * stride_sn + (tl.arange(0, NGT)[None, :, None] * 2 + pair[None, None, :])
    x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = tl.cdiv(K, BLOCK_K)
    else:
        pid_k = tl.program_id(1)
        k_lo = pid_k * TILES_PER_SPLIT
        k_hi = tl.minimum(k_lo + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))  # k_lo >= k_hi: no iteration
        qw_ptrs += k_lo * NW
        sc_ptrs += k_lo * (NGT * 2)
        x_ptrs += k_lo * BLOCK_K
        out_ptr += pid_k.to(tl.int64) * M * N  # this split's [M, N] slice of the workspace

    if SWAP:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi):
        words = tl.load(qw_ptrs)
        sc = tl.load(sc_ptrs)
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & (k0 * BLOCK_K + offs_k < K)[None, :], other=0.0)
        wt = _dequant_tile(words, sc, GROUP, BLOCK_N, BLOCK_K, IS_BF16, USE_ASM)
        if SWAP:
            acc = tl.dot(xt, tl.trans(wt), acc)
        else:
            acc = tl.dot(wt, tl.trans(xt), acc)
        qw_ptrs += NW
        sc_ptrs += NGT * 2
        x_ptrs += BLOCK_K

    n_ok = offs_n < N
    if SWAP:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def db_dequant_kernel(
    qw_ptr, sc_ptr, w_ptr,  # GPU-layout codes and scales; dense [N, K] output (row stride stride_wn)
    N, K,
    stride_qn, stride_sn, stride_wn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_BF16: tl.constexpr, USE_ASM: tl.constexpr,
):
    """Dense weight ``w[n, k]`` (activation dtype) for ``n < N, k < K``; grid ``(cdiv(N, BN), cdiv(K, BK))``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NW: tl.constexpr = BLOCK_K // 16
    NGT: tl.constexpr = BLOCK_K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = tl.minimum(offs_n, N - 1)
    words = tl.load(qw_ptr + rows_n[:, None].to(tl.int64) * stride_qn + (pid_k * NW + tl.arange(0, NW))[None, :])
    pair = tl.arange(0, 2)
    sc = tl.load(sc_ptr + rows_n[:, None, None].to(tl.int64) * stride_sn
                 + ((pid_k * NGT + tl.arange(0, NGT))[None, :, None] * 2 + pair[None, None, :]))
    wt = _dequant_tile(words, sc, GROUP, BLOCK_N, BLOCK_K, IS_BF16, USE_ASM)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], wt, mask=mask)
