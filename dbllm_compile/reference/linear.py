"""Reference forward passes of the two forms of the dual-binary linear.

- Training form: latent weight + learnable scales (and, for the sign codebook, a learnable
  per-group offset ``c``). Bits are re-assigned (nearest level) from the latent weight on every
  call; scales and offset are rounded to their storage dtype first so that the training form
  computes exactly what the deployed model will.
- Deploy form: packed bit planes (see :mod:`dbllm_compile.reference.packing`) + stored scales
  (+ stored offset).

Both dequantize with :func:`~dbllm_compile.reference.dual_binary.dequantize_bits` in float32
(``w_hat = a1*b1 + a2*b2 (+ c)``), cast the weight to the activation dtype and call
``F.linear``; with the same bits, scales and offset the two forms are bit-identical.

:func:`offset_term_reference` is the offset part alone, ``x`` summed over each group of ``G``
features times ``c``: a kernel that computes ``a1*b1 + a2*b2`` only (the Triton kernels) adds it
outside the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbllm_compile.reference.dual_binary import (
    assign_bits,
    dequantize_bits,
    num_groups,
    padded_in_features,
)
from dbllm_compile.reference.packing import unpack_planes

__all__ = [
    "add_offset_term",
    "db_linear_train_reference",
    "db_linear_packed_reference",
    "offset_term_reference",
    "rounded_scales",
    "train_weight_reference",
]


def rounded_scales(
    a1: torch.Tensor, a2: torch.Tensor, scale_dtype: torch.dtype, c: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scales and offset as the deployed model stores them, returned as float32 (``c`` may be None)."""
    sc = None if c is None else c.to(scale_dtype).float()
    return a1.to(scale_dtype).float(), a2.to(scale_dtype).float(), sc


def train_weight_reference(
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    c: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized float32 weight ``[N, K]`` and the bits ``[N, K_pad]`` of the training form.

    With the offset ``c`` the bits are those of ``weight - c`` (all rounded to ``scale_dtype``).
    """
    s1, s2, sc = rounded_scales(a1, a2, scale_dtype, c)
    b1, b2 = assign_bits(weight, s1, s2, group_size, sc)
    w_hat = dequantize_bits(b1, b2, s1, s2, group_size, sc)[:, : weight.shape[1]]
    return w_hat, b1, b2


def db_linear_train_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    scale_dtype: torch.dtype,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ w_hat.T + bias`` with ``w_hat`` from the latent weight (no STE here)."""
    w_hat, _, _ = train_weight_reference(weight, a1, a2, group_size, scale_dtype, c)
    return F.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))


def db_linear_packed_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ w_hat.T + bias`` with ``w_hat = a1*b1 + a2*b2 (+ c)`` unpacked from the
    reference layout."""
    k_pad = padded_in_features(in_features, group_size)
    b1, b2 = unpack_planes(packed, k_pad)
    w_hat = dequantize_bits(b1, b2, a1, a2, group_size, c)[:, :in_features]
    return F.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))


def offset_term_reference(x: torch.Tensor, c: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """The offset's share of the output, float32 ``[..., N]``:

        off[m, n] = sum_g (sum_{k in group g, k < K} x[m, k]) * c[n, g]

    ``x [..., K]`` is upcast to float32 and zero-padded to ``K_pad`` (padded features count
    nothing, exactly as their bits 0 and the ``[:, :K]`` slice do in the reference), summed per
    group to ``[..., n_groups]``, then multiplied by ``c.T`` (``c [N, n_groups]``, upcast).
    ``x @ (a1*b1 + a2*b2 + c)[:, :K].T`` equals ``x @ (a1*b1 + a2*b2)[:, :K].T + off`` up to
    float32 summation order (not bit for bit).

    Example:
        >>> x, c = torch.ones(1, 100), torch.tensor([[1.0, 2.0]])
        >>> offset_term_reference(x, c, 100, 64).tolist()   # 64 * 1 + 36 * 2
        [[136.0]]
    """
    g = num_groups(in_features, group_size)
    pad = g * group_size - in_features
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, pad))
    sums = xf.reshape(*x.shape[:-1], g, group_size).sum(-1)  # [..., n_groups]
    return sums @ c.float().T


def add_offset_term(y: torch.Tensor, x: torch.Tensor, c: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """``y + offset_term_reference(x, c, ...)``, summed in float32 and cast once to ``y.dtype``.

    How a backend whose kernel computes ``x @ (a1*b1 + a2*b2).T + bias`` only (the Triton
    kernels) serves the sign codebook: ``y`` is the kernel's output ``[..., N]``.
    """
    return (y.float() + offset_term_reference(x, c, in_features, group_size)).to(y.dtype)
