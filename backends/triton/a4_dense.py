"""``levels="row"`` through a dense int8 weight and cuBLAS: decode once, ``torch._int_mm``, scale.

With row-level integer levels (:mod:`.a4_reference`) the layer IS an int8 matrix ``w_int [N, K]``
with one float32 step per row, so for large M the product can also run as

1. :func:`row_int8_decode_kernel`: ``qweight`` codes -> ``w_int`` int8 ``[N, K_w]`` (the level
   of each code from the group's table; zero past ``K_pad``), ``N * K_w`` bytes written once;
2. ``torch._int_mm(q, w_int.T)``: cuBLASLt int8 GEMM with int32 accumulation over all of K
   (``q [M, K_w]`` row-major, ``w_int`` read column-major: the "TN" layout of int8 cuBLAS);
3. :func:`row_scale_kernel`: ``y = acc * t[n] * s_x[m] (+ bias)`` in float32, one pass.

Same numbers as :func:`~.a4.a4_row_matmul_kernel` (both sums are exact int32; the scaling is the
same float32 expression), checked against each other and the float64 reference in the tests.
Whether it beats the fused kernel (which decodes inside its K loop, once per row tile of the
output) is for the GPU benchmark (``benchmarks/bench_kernels.py --a4``, key ``a4_row_dense``).
cuBLAS constraints of ``torch._int_mm`` on CUDA: ``M > 16`` (torch builds before the automatic
padding), ``K`` and ``N`` multiples of 8; the launcher checks them on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .a4 import word_codes
from .a4_reference import RowLevels, check_row_k, prepare_row_levels
from .launch import triton_cdiv
from .layout import K_ALIGN, GpuWeights

__all__ = ["row_int8_decode_kernel", "row_scale_kernel", "decode_row_int8", "a4_row_dense_matmul"]


@triton.jit
def row_int8_decode_kernel(qw_ptr, lut_ptr, w_ptr, N, K_W, stride_w, stride_l, stride_d,
                           GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WORDS: tl.constexpr = BLOCK_K // 16
    kk = tl.arange(0, BLOCK_K)
    words = tl.load(qw_ptr + rn_c[:, None] * stride_w + k0 // 16 + tl.arange(0, WORDS)[None, :])
    codes = tl.reshape(word_codes(words), [BLOCK_N, GROUPS, GROUP])
    lut = tl.load(lut_ptr + rn_c[:, None] * stride_l + k0 // GROUP + tl.arange(0, GROUPS)[None, :])
    w = tl.reshape((lut[:, :, None] >> (codes * 8)).to(tl.int8), [BLOCK_N, BLOCK_K])
    mask = (rn[:, None] < N) & (k0 + kk[None, :] < K_W)
    tl.store(w_ptr + rn[:, None] * stride_d + k0 + kk[None, :], w, mask=mask)


@triton.jit
def row_scale_kernel(acc_ptr, sx_ptr, step_ptr, bias_ptr, out_ptr, M, N, stride_a, stride_o,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm[:, None] * stride_a + rn[None, :], mask=mask, other=0)
    t = tl.load(step_ptr + rn, mask=rn < N, other=0.0)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    y = acc.to(tl.float32) * t[None, :] * sx[:, None]  # the fused kernel's expression and order
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def decode_row_int8(gw: GpuWeights, row_levels: RowLevels | None = None, k_w: int | None = None,
                    block_n: int = 64, block_k: int = 256) -> torch.Tensor:
    """The layer's row-level integer weights ``w_int`` int8 ``[N, k_w]`` (``k_w`` between
    ``K_pad`` (default) and ``K_alloc``; zero past ``K_pad``)."""
    k_alloc = gw.qweight.shape[1] * 16
    k_w = gw.k_pad if k_w is None else k_w
    if not gw.k_pad <= k_w <= k_alloc:
        raise ValueError(f"decode_row_int8: k_w={k_w} must lie in [K_pad={gw.k_pad}, K_alloc={k_alloc}]")
    block_k = max(block_k, gw.group_size)
    if block_k % gw.group_size or K_ALIGN % block_k:
        raise ValueError(f"decode_row_int8: block_k={block_k} must be a multiple of group_size={gw.group_size} "
                         f"dividing {K_ALIGN}")
    rl = prepare_row_levels(gw) if row_levels is None else row_levels
    n = gw.out_features
    w = torch.empty(n, k_w, dtype=torch.int8, device=gw.qweight.device)
    grid = (triton_cdiv(n, block_n), triton_cdiv(k_w, block_k))
    row_int8_decode_kernel[grid](gw.qweight, rl.lut, w, n, k_w, gw.qweight.stride(0), rl.lut.stride(0), w.stride(0),
                                 GROUP=gw.group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def a4_row_dense_matmul(q: torch.Tensor, s: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None,
                        out_dtype: torch.dtype, *, row_levels: RowLevels | None = None,
                        w_int: torch.Tensor | None = None) -> torch.Tensor:
    """``levels="row"`` as decode + ``torch._int_mm`` + scale (module docstring): int8 codes
    ``q [M, K_w]`` (``K_pad <= K_w <= K_alloc``, zero past K, row-major) and float32 scales
    ``s [M]`` -> ``[M, N]`` in ``out_dtype``. ``w_int``: a decoded weight to reuse (else decoded
    in this call, as the benchmark times it)."""
    m, k_w = q.shape
    n = gw.out_features
    check_row_k(gw.in_features, "a4_row_dense_matmul")
    if q.dtype != torch.int8 or not q.is_contiguous() or not gw.k_pad <= k_w <= gw.qweight.shape[1] * 16:
        raise ValueError(f"a4_row_dense_matmul: codes must be contiguous int8 [M, K_w] with {gw.k_pad} <= K_w <= "
                         f"{gw.qweight.shape[1] * 16}, got {q.dtype} {tuple(q.shape)}")
    if q.is_cuda and (m <= 16 or n % 8):
        raise ValueError(f"a4_row_dense_matmul: torch._int_mm on CUDA needs M > 16 and N % 8 == 0, got M={m}, "
                         f"N={n}; use a4_matmul(..., levels='row') (the fused kernel) for this shape")
    rl = prepare_row_levels(gw) if row_levels is None else row_levels
    if w_int is None:
        w_int = decode_row_int8(gw, rl, k_w)
    elif w_int.dtype != torch.int8 or tuple(w_int.shape) != (n, k_w):
        raise ValueError(f"a4_row_dense_matmul: w_int must be int8 {(n, k_w)} (decode_row_int8(gw, k_w={k_w})), "
                         f"got {w_int.dtype} {tuple(w_int.shape)}")
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    acc = torch._int_mm(q, w_int.t())
    if bias is not None:
        bias = bias.to(out_dtype)
    grid = (triton_cdiv(m, 64), triton_cdiv(n, 64))
    row_scale_kernel[grid](acc, s, rl.step, bias if bias is not None else rl.step, out, m, n, acc.stride(0),
                           out.stride(0), BLOCK_M=64, BLOCK_N=64, HAS_BIAS=bias is not None)
    return out
