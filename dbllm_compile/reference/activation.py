"""Dynamic per-token 4-bit activation quantization with a learnable clipping ratio (reference).

This is the one definition of the W(1+1)A4 activation numerics; the ops in
:mod:`dbllm_compile.ops` and any kernel are tested against it.

Granularity
    Per token: every row ``x[..., :]`` of the input ``[..., K]`` (all leading dimensions
    flattened) gets its own scale, computed on the fly from that row (dynamic; nothing about
    the activations is stored). One learnable clipping ratio ``r`` is shared by all tokens of a
    quantized activation (one per layer, or one per group of sibling linears such as q/k/v).

Scale
    ``m = max_k |x[t, k]|`` (float32), ``s[t] = r * m / 7``; a row of zeros gets ``s = 1`` (its
    codes are all 0, so the value of ``s`` does not matter but stays finite).

Codes
    ``q = clamp(round(x / s), -7, 7)`` with ``round`` = ``torch.round``, i.e. **round half to
    even** (the rounding of IEEE ``rint`` and of the GPU's ``cvt.rni``, so a kernel can use the
    hardware instruction). The range is the **symmetric** ``[-7, 7]``: zero is exact, positive
    and negative activations get the same resolution, and the max-abs element maps exactly to
    ``+-7`` when ``r = 1`` (the asymmetric ``[-8, 7]`` would need ``m / 7.5``-style scales that
    fit one sign better than the other with no benefit for roughly symmetric activations).
    Codes are stored as ``int8`` (a subset of the signed 4-bit range ``[-8, 7]``, so the
    kernels' int4 packing holds them) with a float32 scale per token.

Dequantized value
    ``x_hat = q * s`` in float32, cast back to the dtype of ``x``. :func:`fake_quantize_activation`
    is literally ``dequantize_activation(*quantize_activation_int(x, r))``, so the training
    (fake-quant) form and the integer form agree bit for bit.

Clipping ratio parameterisation
    The learnable parameter is a float32 logit ``theta`` (one element); ``r = sigmoid(theta)``
    stays in ``(0, 1)`` for every finite ``theta`` and never gets stuck at a clamp boundary
    (``theta = +inf`` gives exactly ``r = 1``, naive max-abs quantization, for comparisons).
    The default initialisation is ``r = 0.95`` (:data:`DEFAULT_CLIP_RATIO`).

Gradients (straight-through, LSQ/PACT style; ``u = x / s``)
    - ``d x_hat / d x = 1`` where ``|u| <= 7`` (not clipped), ``0`` where clipped; the per-token
      max ``m`` is treated as a constant (not differentiated), as in dynamic quantizers.
    - ``d x_hat / d s = round(u) - u`` inside the range (the LSQ rounding term) and
      ``clamp(round(u), -7, 7) = +-7`` where clipped (the PACT clipping term); then
      ``d s / d r = m / 7`` and ``d r / d theta = r (1 - r)``. The gradient of ``theta`` is the
      sum over all elements (no LSQ gradient rescaling; pick the learning rate instead).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ACT_QMAX",
    "DEFAULT_CLIP_RATIO",
    "clip_logit_from_ratio",
    "clip_ratio_from_logit",
    "dequantize_activation",
    "fake_quantize_activation",
    "fake_quantize_activation_backward",
    "quantize_activation_int",
    "straight_through_mask",
]

ACT_QMAX = 7
"""Largest code magnitude: codes lie in ``[-7, 7]``."""

DEFAULT_CLIP_RATIO = 0.95
"""Initial clipping ratio ``r`` of a new activation quantizer."""


def clip_logit_from_ratio(ratio: float) -> float:
    """The logit ``theta`` with ``sigmoid(theta) = ratio`` (``ratio = 1`` gives ``+inf``).

    Example:
        >>> round(clip_logit_from_ratio(0.5), 6)
        0.0
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clipping ratio must be in (0, 1], got {ratio!r}")
    return math.inf if ratio == 1.0 else math.log(ratio / (1.0 - ratio))


def clip_ratio_from_logit(clip_logit: torch.Tensor) -> torch.Tensor:
    """``r = sigmoid(theta)`` in float32, shape ``[]`` (``clip_logit`` has one element)."""
    if clip_logit.numel() != 1:
        raise ValueError(
            f"the activation clip parameter must have exactly one element, got shape "
            f"{tuple(clip_logit.shape)}"
        )
    return torch.sigmoid(clip_logit.float().reshape(()))


def _token_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dimension, float32 ``[..., 1]``."""
    return x.float().abs().amax(dim=-1, keepdim=True)


def _scale(m: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # IEEE division by a tensor, not by the Python number: on CUDA PyTorch divides by a scalar as
    # a multiplication by its reciprocal, which moves s by an ulp and flips codes at ties (so the
    # CPU reference, the CUDA reference and the Triton kernel's div_rn would disagree).
    s = (ratio.float() * m) / torch.full_like(m, float(ACT_QMAX))
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_activation_int(x: torch.Tensor, clip_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form: ``int8`` codes ``[..., K]`` in ``[-7, 7]`` and float32 scales ``[..., 1]``.

    Args:
        x: activations ``[..., K]`` (any float dtype; computed in float32).
        clip_ratio: ``r`` in ``(0, 1]``, a float32 tensor with one element (not the logit).

    Example:
        >>> q, s = quantize_activation_int(torch.tensor([[7.0, -3.5, 2.5, 0.0]]), torch.tensor(1.0))
        >>> q.tolist(), s.flatten().tolist()  # -3.5 -> -4 and 2.5 -> 2: half to even
        ([[7, -4, 2, 0]], [1.0])
    """
    s = _scale(_token_max(x), clip_ratio.reshape(()))
    q = torch.clamp(torch.round(x.float() / s), -ACT_QMAX, ACT_QMAX)
    return q.to(torch.int8), s


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` in float32, cast to ``dtype``; ``[..., K]``."""
    return (codes.float() * scale).to(dtype)


def fake_quantize_activation(x: torch.Tensor, clip_ratio: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``[..., K]`` in the dtype of ``x`` (no autograd; see the ops)."""
    codes, scale = quantize_activation_int(x, clip_ratio)
    return dequantize_activation(codes, scale, x.dtype)


def straight_through_mask(x: torch.Tensor, clip_ratio: torch.Tensor) -> torch.Tensor:
    """bool ``[..., K]``: True where ``|x / s| <= 7`` (the gradient passes), False where clipped."""
    s = _scale(_token_max(x), clip_ratio.reshape(()))
    return (x.float() / s).abs() <= ACT_QMAX


def fake_quantize_activation_backward(
    grad_out: torch.Tensor, x: torch.Tensor, clip_logit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through gradients ``(dL/dx, dL/dtheta)`` of the fake quantizer (module docstring).

    ``grad_out`` and ``x`` are ``[..., K]``; ``dL/dx`` has the dtype of ``x``, ``dL/dtheta``
    the shape and dtype of ``clip_logit``.
    """
    r = clip_ratio_from_logit(clip_logit)
    m = _token_max(x)
    s = _scale(m, r)
    u = x.float() / s
    inside = u.abs() <= ACT_QMAX
    g = grad_out.float()
    grad_x = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype)
    d_s = torch.where(inside, torch.round(u) - u, torch.clamp(torch.round(u), -ACT_QMAX, ACT_QMAX))
    d_r = (g * d_s * (m / ACT_QMAX)).sum()
    grad_theta = (d_r * r * (1 - r)).reshape(clip_logit.shape).to(clip_logit.dtype)
    return grad_x, grad_theta
