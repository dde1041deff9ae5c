"""``dbllm::db_linear_train`` as plain torch ops, for Inductor to fuse into the training graph.

The custom op is opaque to Inductor; its decomposition lets the straight-through estimator, the
bit assignment and the matmul's operand be generated as fused kernels (``decompose_train``,
docs/compile.md). It must compute the *same* bits as the op: the scales are rounded to the
stored ``scale_dtype`` before the nearest-level bits are chosen.

Why the rounding is done in integer ops (:func:`round_like_cast`): ``a.to(float16).float()``
inside a fused kernel is a round trip that Inductor drops unless ``emulate_precision_casts`` is
on, and with torch 2.11 (the GPU machines' version) the flag did not keep it on CPU or CUDA: the
compiled training weight differed from the eager one in 36% of the entries, by up to a whole
level where a weight sat within a rounding step of a decision boundary (H100 machine,
2026-11-24; torch 2.13 on CPU kept the cast). Integer operations on the float32 bits are not
simplified away by any version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbllm_compile.reference.dual_binary import assign_bits, dequantize_bits

__all__ = ["db_linear_train_decomposed", "round_like_cast", "train_weight_decomposed"]

_DROPPED_BITS = {torch.float16: 13, torch.bfloat16: 16}  # float32 mantissa bits the cast drops


def round_like_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype).float()`` for finite float32 ``x``, computed on the float32 bits.

    Round to nearest, ties to even, on the magnitude's bits: add ``2^(d-1) - 1`` plus the lowest
    kept bit, clear the ``d`` dropped bits (a carry into the exponent is the correct rounding up).
    For float16 below its smallest normal (``2^-14``) the step is the absolute ``2^-24``
    (``round(x * 2^24) / 2^24``, exact in float32), and from 65,520 on the cast gives ``inf``.

    Example:
        >>> x = torch.tensor([0.1, -1.0 / 3, 1e-6, 3e-5, 70000.0])
        >>> torch.equal(round_like_cast(x, torch.float16), x.to(torch.float16).float())
        True
    """
    x = x.float()
    if dtype == torch.float32:
        return x
    if dtype not in _DROPPED_BITS:
        raise ValueError(f"round_like_cast: scale dtype {dtype} is not float16, bfloat16 or float32")
    d = _DROPPED_BITS[dtype]
    i = x.view(torch.int32)
    lowest_kept = (i >> d) & 1
    r = ((i + ((1 << (d - 1)) - 1) + lowest_kept) & -(1 << d)).view(torch.float32)
    if dtype == torch.float16:
        sub = torch.round(x * 2.0**24) * 2.0**-24
        r = torch.where(x.abs() < 2.0**-14, sub, r)
        r = torch.where(x.abs() >= 65520.0, torch.copysign(torch.full_like(x, float("inf")), x), r)
    return r


def _straight_through_round(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round(a)`` in value, gradient 1 (``a + (round(a) - a).detach()``; exact by Sterbenz's lemma)."""
    return a + (round_like_cast(a, dtype) - a).detach()


def train_weight_decomposed(weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group_size: int,
                            scale_dtype: torch.dtype, c: torch.Tensor | None = None) -> torch.Tensor:
    """The training form's float32 weight ``[N, K]``, with the op's gradients (see below)."""
    s1 = _straight_through_round(a1, scale_dtype)
    s2 = _straight_through_round(a2, scale_dtype)
    sc = None if c is None else _straight_through_round(c, scale_dtype)
    b1, b2 = assign_bits(weight.detach(), s1.detach(), s2.detach(), group_size, None if sc is None else sc.detach())
    w_hat = dequantize_bits(b1, b2, s1, s2, group_size, sc)[:, : weight.shape[1]]
    return w_hat + (weight - weight.detach()).float()


def db_linear_train_decomposed(x: torch.Tensor, weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor,
                               bias: torch.Tensor | None, group_size: int, scale_dtype: torch.dtype,
                               c: torch.Tensor | None = None) -> torch.Tensor:
    """``dbllm::db_linear_train`` as plain torch ops (same forward values, same gradients).

    - scales rounded to ``scale_dtype`` straight through (:func:`round_like_cast`, gradient 1);
    - bits: :func:`~dbllm_compile.reference.dual_binary.assign_bits` on detached values;
    - ``w_hat`` from :func:`~dbllm_compile.reference.dual_binary.dequantize_bits`, so
      ``dL/da1 = sum_group dL/dw_hat * b1`` by autograd (and ``dL/dc = sum_group dL/dw_hat`` for
      the sign codebook's offset, rounded straight through like the scales);
    - latent weight straight through: ``w_hat + (weight - weight.detach())`` (adds an exact 0).
    """
    w_ste = train_weight_decomposed(weight, a1, a2, group_size, scale_dtype, c)
    return F.linear(x, w_ste.to(x.dtype), None if bias is None else bias.to(x.dtype))
