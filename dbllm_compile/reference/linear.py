"""Reference forward passes of the two forms of the dual-binary linear.

- Training form: latent weight + learnable scales. Bits are re-assigned (nearest level) from
  the latent weight on every call; scales are rounded to their storage dtype first so that the
  training form computes exactly what the deployed model will.
- Deploy form: packed bit planes (see :mod:`dbllm_compile.reference.packing`) + stored scales.

Both dequantize with :func:`~dbllm_compile.reference.dual_binary.dequantize_bits` in float32,
cast the weight to the activation dtype and call ``F.linear``; with the same bits and scales the
two forms are bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbllm_compile.reference.dual_binary import (
    assign_bits,
    dequantize_bits,
    padded_in_features,
)
from dbllm_compile.reference.packing import unpack_planes

__all__ = ["db_linear_train_reference", "db_linear_packed_reference", "train_weight_reference"]


def rounded_scales(
    a1: torch.Tensor, a2: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales as the deployed model stores them, returned as float32."""
    return a1.to(scale_dtype).float(), a2.to(scale_dtype).float()


def train_weight_reference(
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized float32 weight ``[N, K]`` and the bits ``[N, K_pad]`` of the training form."""
    s1, s2 = rounded_scales(a1, a2, scale_dtype)
    b1, b2 = assign_bits(weight, s1, s2, group_size)
    w_hat = dequantize_bits(b1, b2, s1, s2, group_size)[:, : weight.shape[1]]
    return w_hat, b1, b2


def db_linear_train_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    scale_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = x @ w_hat.T + bias`` with ``w_hat`` from the latent weight (no STE here)."""
    w_hat, _, _ = train_weight_reference(weight, a1, a2, group_size, scale_dtype)
    return F.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))


def db_linear_packed_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``y = x @ w_hat.T + bias`` with ``w_hat`` unpacked from the reference layout."""
    k_pad = padded_in_features(in_features, group_size)
    b1, b2 = unpack_planes(packed, k_pad)
    w_hat = dequantize_bits(b1, b2, a1, a2, group_size)[:, :in_features]
    return F.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))
