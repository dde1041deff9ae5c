"""4-bit activations (W(1+1)A4) on the GPU: per-token quantization kernel + int8 GEMM.

Two kernels, both tested under the Triton interpreter against torch references of the same
integer arithmetic (:func:`a4_linear_reference`), and against the module-level numerics
(:mod:`dbllm_compile.reference.activation` then the dual-binary linear):

- :func:`act_quant_kernel`: one program per token row. Pass 1: ``m = max |x|`` (float32).
  ``s = r * m / 7`` with IEEE division (``div_rn``), ``s = 1`` for a row of zeros. Pass 2:
  ``q = clamp(rint(x / s), -7, 7)`` as ``int8`` (round half to even, written with floor so the
  interpreter and the GPU run the same code), zero past ``K`` up to ``K_alloc``. These are
  exactly the codes and scales of :func:`~dbllm_compile.reference.activation.quantize_activation_int`
  (tested bit for bit).
- :func:`a4_matmul_kernel` (``levels="exact"`` / ``"group"``): ``y[m, n] = s_x[m] * sum_g P_g[m, n]
  (+ bias[n])`` over the groups of ``G`` input features, reading the weights in the GPU layout of
  :mod:`.layout` (the same ``qweight``/``scales`` as the 16-bit kernels: no second copy). Per
  group, with ``q`` the int8 codes of the activations:

  * ``"exact"``: ``P_g = a1 * (q . b1) + a2 * (q . b2)``, two int8 products with int32
    accumulation per group, scaled in float32.
  * ``"group"`` (one product per group, the kernel issue's note): the four levels
    ``{0, a2, a1, a1 + a2}`` of a row's group are written as integer multiples of one step
    ``t = max(|a1|, |a2|, |a1 + a2|) / 127``: ``i1 = rint(a1 / t)``, ``i2 = rint(a2 / t)``,
    ``w_int = b1 * i1 + b2 * i2`` clamped to ``[-127, 127]``, ``P_g = t * (q . w_int)``. Each
    level moves by at most ``t / 2`` (relative ``1/254`` of the group's largest level), far
    below the 2-bit error itself; :func:`int_level_error` measures it on real weights.

  The dot shape is ``[BLOCK_M, G] x [G, BLOCK_N]`` with ``G`` a multiple of 32 (int8 MMA needs
  K >= 32), and the whole float32 accumulator tile is rescaled after every group.
- :func:`a4_row_matmul_kernel` (``levels="row"``): one step ``t[n]`` per output row instead of
  per group (:mod:`.a4_reference`), so ``w_int`` is an int8 matrix with one scale per row and
  ``y[m, n] = s_x[m] * t[n] * sum_k q[m, k] * w_int[n, k] (+ bias[n])``: the K loop steps
  ``BLOCK_K`` features (a multiple of ``G``, several groups) per iteration, decodes the codes of
  the tile into int8 levels through one int32 per group holding its four levels
  (:func:`~.a4_reference.level_lut`; ``level = (lut >> 8 * code)`` truncated to int8), and issues
  one int8 ``tl.dot`` into an int32 accumulator; float scaling happens once, after the loop.
  int32 cannot overflow for ``K <= ROW_MAX_K`` (2,415,617; checked by the launcher). The per-row
  steps and group tables (:class:`~.a4_reference.RowLevels`, 4 bytes per group) are derived once
  per layer by :func:`~.a4_reference.prepare_row_levels`. Programs are ordered in bands of
  ``GROUP_M`` row tiles (L2 reuse of the weight tiles, as in Triton's matmul tutorial). For large
  M the same product can also run as decode-to-int8 + ``torch._int_mm`` (:mod:`.a4_dense`).

Integer products are exact, so every kernel differs from the float64 evaluation of the same
formula (:func:`a4_linear_reference`) only by the float32 scaling/accumulation and the final
rounding to the activation dtype.

Status: correctness tested under the interpreter (CI). ``"exact"`` and ``"group"`` were timed on
an H100 (``docs/kernels.md``); ``"row"`` is not timed yet. The CUDA implementation of
``dbllm::db_linear_a4`` (:mod:`.int_dispatch`) runs ``"exact"``; the other modes change the
weights' levels and are opt-in through :func:`a4_matmul` / :func:`a4_linear` only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .a4_reference import (LEVELS, ROW_MAX_K, RowLevels, a4_linear_reference, check_levels, check_row_k,
                           int_level_error, int_levels, prepare_row_levels, row_int_levels)
from .launch import interpreted, triton_cdiv
from .layout import K_ALIGN, GpuWeights

__all__ = ["word_codes", "act_quant_kernel", "a4_matmul_kernel", "a4_row_matmul_kernel", "act_quant_int8", "a4_matmul", "a4_linear",
           "a4_linear_reference", "int_levels", "row_int_levels", "prepare_row_levels", "RowLevels", "int_level_error",
           "a4_supported", "default_a4_blocks", "default_a4_row_blocks", "LEVELS", "ROW_MAX_K"]

ACT_QMAX = 7


def a4_supported(group_size: int) -> bool:
    """The int8 GEMM needs the group (its dot's K) to be a multiple of 32."""
    return group_size % 32 == 0 and 1024 % group_size == 0


@triton.jit
def _rint(u):
    """Round half to even (``torch.round``) of float32 ``u`` with ``|u| < 2**22``."""
    f = tl.floor(u + 0.5)
    tie = (f - u) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(tie & odd, f - 1.0, f)


@triton.jit
def act_quant_kernel(x_ptr, ratio_ptr, q_ptr, s_ptr, K, K_ALLOC, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    r = tl.load(ratio_ptr).to(tl.float32)
    offs = tl.arange(0, BLOCK_K)
    m = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(x))
    s = tl.math.div_rn(r * tl.max(m, axis=0), 7.0)
    s = tl.where(s > 0.0, s, 1.0)
    for k0 in range(0, K_ALLOC, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)), -7.0), 7.0)
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(tl.int8), mask=k0 + offs < K_ALLOC)
    tl.store(s_ptr + row, s)


@triton.jit
def word_codes(words):
    """int32 code words ``[R, W]`` of the GPU layout -> their 2-bit codes ``b1 + 2*b2``,
    ``[R, W, 16]`` in element order (element ``e`` of a word has b1 at bit
    ``sh(q) + 4*(2*slot + h)``, ``e = 8*slot + 2*q + h``, ``sh(q) = 2*(q % 2) + 16*(q // 2)``;
    :mod:`.layout`)."""
    e = tl.arange(0, 16)
    q = (e % 8) // 2
    shifts = 2 * (q % 2) + 16 * (q // 2) + 4 * (2 * (e // 8) + e % 2)
    return (words[:, :, None] >> shifts[None, None, :]) & 3


@triton.jit
def a4_matmul_kernel(q_ptr, sx_ptr, qw_ptr, sc_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_q, stride_w, stride_s, stride_o,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     INT_LEVELS: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)  # rows past N read row N-1 (no load mask); the store is masked
    WORDS: tl.constexpr = GROUP // 16
    kk = tl.arange(0, GROUP)
    ww = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, tl.cdiv(K, GROUP)):
        qa = tl.load(q_ptr + rm[:, None] * stride_q + g * GROUP + kk[None, :], mask=rm[:, None] < M, other=0)
        words = tl.load(qw_ptr + rn_c[:, None] * stride_w + g * WORDS + ww[None, :])  # int32 [BN, WORDS]
        codes = tl.reshape(word_codes(words), [BLOCK_N, GROUP])
        a1 = tl.load(sc_ptr + rn_c * stride_s + 2 * g).to(tl.float32)
        a2 = tl.load(sc_ptr + rn_c * stride_s + 2 * g + 1).to(tl.float32)
        if INT_LEVELS:
            top = tl.maximum(tl.maximum(tl.abs(a1), tl.abs(a2)), tl.abs(a1 + a2))
            step = tl.math.div_rn(top, 127.0)
            step = tl.where(step > 0.0, step, 1.0)
            i1 = _rint(tl.math.div_rn(a1, step)).to(tl.int32)
            i2 = _rint(tl.math.div_rn(a2, step)).to(tl.int32)
            w = (codes & 1) * i1[:, None] + (codes >> 1) * i2[:, None]
            w = tl.minimum(tl.maximum(w, -127), 127).to(tl.int8)
            d = tl.dot(qa, tl.trans(w), out_dtype=tl.int32)
            acc += d.to(tl.float32) * step[None, :]
        else:
            b1 = (codes & 1).to(tl.int8)
            b2 = (codes >> 1).to(tl.int8)
            d1 = tl.dot(qa, tl.trans(b1), out_dtype=tl.int32)
            d2 = tl.dot(qa, tl.trans(b2), out_dtype=tl.int32)
            acc += d1.to(tl.float32) * a1[None, :] + d2.to(tl.float32) * a2[None, :]
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    y = acc * sx[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def a4_row_matmul_kernel(
        # pointers: int8 codes [M, >= K], float32 token scales [M], int32 qweight [N, K_alloc/16],
        # int32 level tables [N, K_alloc/G], float32 row steps [N], bias [N], output [M, N]
        q_ptr, sx_ptr, qw_ptr, lut_ptr, step_ptr, bias_ptr, out_ptr,
        # dimensions and strides (elements)
        M, N, K, stride_q, stride_w, stride_l, stride_o,
        # meta-parameters: BLOCK_K a multiple of GROUP dividing K_ALIGN
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    # program order: bands of GROUP_M row tiles, column tiles inside a band
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_m
    pid_n = (pid % (GROUP_M * tiles_n)) // band_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)  # rows past N read row N-1 (no load mask); the store is masked
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WORDS: tl.constexpr = BLOCK_K // 16
    kk = tl.arange(0, BLOCK_K)
    ww = tl.arange(0, WORDS)
    gg = tl.arange(0, GROUPS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        qa = tl.load(q_ptr + rm[:, None] * stride_q + k0 + kk[None, :],
                     mask=(rm[:, None] < M) & (k0 + kk[None, :] < K), other=0)       # int8 [BM, BK]
        words = tl.load(qw_ptr + rn_c[:, None] * stride_w + k0 // 16 + ww[None, :])  # int32 [BN, WORDS]
        codes = tl.reshape(word_codes(words), [BLOCK_N, GROUPS, GROUP])
        lut = tl.load(lut_ptr + rn_c[:, None] * stride_l + k0 // GROUP + gg[None, :])  # int32 [BN, GROUPS]
        w = (lut[:, :, None] >> (codes * 8)).to(tl.int8)  # byte `code` of the group's table
        acc = tl.dot(qa, tl.trans(tl.reshape(w, [BLOCK_N, BLOCK_K])), acc, out_dtype=tl.int32)
    t = tl.load(step_ptr + rn_c)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    y = acc.to(tl.float32) * t[None, :] * sx[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def act_quant_int8(x2: torch.Tensor, clip_ratio: torch.Tensor, k_alloc: int | None = None,
                   block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` -> int8 codes ``[M, k_alloc]`` (zero past K) and float32 scales ``[M]``.

    ``clip_ratio``: ``r`` in ``(0, 1]``, one element (the ratio, not the logit).
    """
    m, k = x2.shape
    k_alloc = k if k_alloc is None else k_alloc
    if k_alloc < k:
        raise ValueError(f"act_quant_int8: k_alloc={k_alloc} < K={k}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(m, k_alloc, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        ratio = clip_ratio.reshape(1).to(device=x2.device, dtype=torch.float32)
        bk = min(block_k, triton.next_power_of_2(max(k_alloc, 16)))
        act_quant_kernel[(m,)](x2, ratio, q, s, k, k_alloc, x2.stride(0), q.stride(0), BLOCK_K=bk)
    return q, s


def default_a4_blocks(m: int) -> tuple[int, int, int, int]:
    """Untuned ``(block_m, block_n, num_warps, num_stages)`` of the exact/group kernel by M."""
    if m <= 16:
        return 16, 64, 4, 3
    if m <= 64:
        return 64, 64, 4, 3
    return 128, 128, 8, 3


def default_a4_row_blocks(m: int, group_size: int) -> tuple[int, int, int, int, int]:
    """Untuned ``(block_m, block_n, block_k, num_warps, num_stages)`` of the row kernel by M
    (not yet measured on a GPU; ``block_k`` at least one group)."""
    if m <= 16:
        bm, bn, bk, w, st = 16, 64, 256, 4, 3
    elif m <= 64:
        bm, bn, bk, w, st = 64, 64, 128, 4, 3
    else:
        bm, bn, bk, w, st = 128, 128, 128, 8, 3
    return bm, bn, max(bk, group_size), w, st


def _check_row_block_k(block_k: int, group_size: int) -> None:
    if block_k % group_size or K_ALIGN % block_k:
        raise ValueError(f"a4_matmul: block_k={block_k} must be a multiple of group_size={group_size} that divides "
                         f"{K_ALIGN} (e.g. {max(group_size, 128)})")


def _check_row_levels(rl: RowLevels, gw: GpuWeights) -> None:
    step_ok = rl.step.dtype == torch.float32 and tuple(rl.step.shape) == (gw.out_features,)
    lut_ok = rl.lut.dtype == torch.int32 and tuple(rl.lut.shape) == tuple(gw.scales.shape[:2]) and rl.lut.stride(-1) == 1
    if not (step_ok and lut_ok):
        raise ValueError(f"a4_matmul: row_levels do not match the layer (step float32 [{gw.out_features}], lut int32 "
                         f"{tuple(gw.scales.shape[:2])} expected, got {rl.step.dtype} {tuple(rl.step.shape)}, "
                         f"{rl.lut.dtype} {tuple(rl.lut.shape)}); build them with prepare_row_levels(gw)")


def a4_matmul(q: torch.Tensor, s: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, out_dtype: torch.dtype, *,
              levels: str = "exact", row_levels: RowLevels | None = None, block_m: int | None = None,
              block_n: int | None = None, block_k: int | None = None, group_m: int = 8,
              num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """int8 codes ``q [M, >= K_pad]`` (zero past K) and float32 token scales ``s [M]`` ->
    ``[M, N]`` in ``out_dtype`` (module docstring).

    ``levels``: ``"exact"`` (default), ``"group"`` or ``"row"`` (:mod:`.a4_reference`).
    ``row_levels``: the layer's :func:`prepare_row_levels` (``"row"`` only; derived on every
    call when omitted). ``block_k`` and ``group_m`` apply to ``"row"`` only (the other kernels
    step one group at a time); block sizes left ``None`` come from :func:`default_a4_blocks` /
    :func:`default_a4_row_blocks`.
    """
    check_levels(levels, "a4_matmul")
    if not a4_supported(gw.group_size):
        raise ValueError(f"a4_matmul: group_size={gw.group_size} is not a multiple of 32 dividing 1024")
    m = q.shape[0]
    n = gw.out_features
    if q.shape[1] < gw.k_pad or q.dtype != torch.int8 or q.stride(-1) != 1:
        raise ValueError(f"a4_matmul: codes must be int8 [M, >= {gw.k_pad}] with unit stride, got "
                         f"{q.dtype} {tuple(q.shape)}")
    if levels != "row" and block_k not in (None, gw.group_size):
        raise ValueError(f"a4_matmul: block_k={block_k} applies to levels='row' only; the {levels!r} kernel steps "
                         f"one group (G={gw.group_size}) at a time (leave block_k=None)")
    if levels != "row" and row_levels is not None:
        raise ValueError(f"a4_matmul: row_levels were given with levels={levels!r}; pass levels='row'")
    if levels == "row":
        check_row_k(gw.in_features, "a4_matmul")
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    if bias is not None:
        bias = bias.to(out_dtype)
    if levels == "row":
        bm, bn, bk, w, st = default_a4_row_blocks(m, gw.group_size)
        bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
        _check_row_block_k(bk, gw.group_size)
        if group_m < 1:
            raise ValueError(f"a4_matmul: group_m={group_m} must be >= 1 (row tiles per band of programs)")
        rl = prepare_row_levels(gw) if row_levels is None else row_levels
        _check_row_levels(rl, gw)
        kw = {} if interpreted() else {"num_warps": num_warps or w, "num_stages": num_stages or st}
        grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
        a4_row_matmul_kernel[grid](q, s, gw.qweight, rl.lut, rl.step, bias if bias is not None else rl.step, out,
                                   m, n, gw.in_features, q.stride(0), gw.qweight.stride(0), rl.lut.stride(0),
                                   out.stride(0), GROUP=gw.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                   GROUP_M=group_m, HAS_BIAS=bias is not None, **kw)
        return out
    bm, bn, w, st = default_a4_blocks(m)
    bm, bn = block_m or bm, block_n or bn
    kw = {} if interpreted() else {"num_warps": num_warps or w, "num_stages": num_stages or st}
    grid = (triton_cdiv(m, bm), triton_cdiv(n, bn))
    a4_matmul_kernel[grid](q, s, gw.qweight, gw.scales, bias if bias is not None else gw.scales, out,
                           m, n, gw.in_features, q.stride(0), gw.qweight.stride(0), gw.scales.stride(0),
                           out.stride(0), GROUP=gw.group_size, BLOCK_M=bm, BLOCK_N=bn,
                           INT_LEVELS=levels == "group", HAS_BIAS=bias is not None, **kw)
    return out


def a4_linear(x2: torch.Tensor, clip_ratio: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None = None, *,
              levels: str = "exact", row_levels: RowLevels | None = None, block_m: int | None = None,
              block_n: int | None = None, block_k: int | None = None, group_m: int = 8,
              num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``x2 [M, K]`` (fp16/bf16) -> ``[M, N]`` in its dtype: quantize (kernel 1), then the int8
    GEMM of ``levels`` (:func:`a4_matmul`)."""
    if x2.shape[1] != gw.in_features:
        raise ValueError(f"a4_linear: x has {x2.shape[1]} features, layer expects {gw.in_features}")
    q, s = act_quant_int8(x2, clip_ratio, gw.qweight.shape[1] * 16)
    return a4_matmul(q, s, gw, bias, x2.dtype, levels=levels, row_levels=row_levels, block_m=block_m,
                     block_n=block_n, block_k=block_k, group_m=group_m, num_warps=num_warps, num_stages=num_stages)
