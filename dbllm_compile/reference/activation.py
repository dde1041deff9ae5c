"""Dynamic 4-bit activation quantization (per token, or per token and feature group) with a
learnable clipping ratio (reference).

This is the one definition of the W(1+1)A4 activation numerics; the ops in
:mod:`dbllm_compile.ops` and any kernel are tested against it.

Granularity
    The input ``[..., K]`` is viewed as token rows ``x[t, :]`` (all leading dimensions
    flattened). Every scale is computed on the fly from the activations (dynamic; nothing about
    the activations is stored). The group size ``G`` (``group_size``; ``DBLLMConfig.activation_group_size``)
    chooses how many scales a row gets:

    - ``G = 0`` (the default): **per token**, one scale per row over all ``K`` features.
    - ``G > 0``: **per token and group**, one scale per row and per block of ``G`` contiguous
      features ``x[t, g*G : (g+1)*G]``, ``g = 0 .. K/G - 1``. ``K`` must be divisible by ``G``
      (otherwise a ``ValueError`` naming ``K`` and ``G``); ``G = K`` is bit for bit the same as
      ``G = 0``. A few channels with massive activations then only coarsen the scale of their
      own group instead of rounding every other feature of the token to 0.

    One learnable clipping ratio ``r`` is shared by all tokens and all groups of a quantized
    activation (one per layer, or one per set of sibling linears such as q/k/v).

Scale
    ``m = max |x|`` over the row (``G = 0``) or over the group (``G > 0``), in float32;
    ``s = r * m / 7``; an all-zero row or group gets ``s = 1`` (its codes are all 0, so the
    value of ``s`` does not matter but stays finite).

Codes
    ``q = clamp(round(x / s), -7, 7)`` with ``s`` the scale of the element's row (and group),
    ``round`` = ``torch.round``, i.e. **round half to
    even** (the rounding of IEEE ``rint`` and of the GPU's ``cvt.rni``, so a kernel can use the
    hardware instruction). The range is the **symmetric** ``[-7, 7]``: zero is exact, positive
    and negative activations get the same resolution, and the max-abs element maps exactly to
    ``+-7`` when ``r = 1`` (the asymmetric ``[-8, 7]`` would need ``m / 7.5``-style scales that
    fit one sign better than the other with no benefit for roughly symmetric activations).
    Codes are stored as ``int8`` (a subset of the signed 4-bit range ``[-8, 7]``, so the
    kernels' int4 packing holds them) with float32 scales: ``[..., 1]`` per token (``G = 0``),
    ``[..., K/G]`` per token and group (``G > 0``).

Dequantized value
    ``x_hat = q * s`` in float32 (each element times the scale of its row and group), cast back
    to the dtype of ``x``. :func:`fake_quantize_activation` is literally
    ``dequantize_activation(*quantize_activation_int(x, r, G))``, so the training (fake-quant)
    form and the integer form agree bit for bit.

Clipping ratio parameterisation
    The learnable parameter is a float32 logit ``theta`` (one element); ``r = sigmoid(theta)``
    stays in ``(0, 1)`` for every finite ``theta`` and never gets stuck at a clamp boundary
    (``theta = +inf`` gives exactly ``r = 1``, naive max-abs quantization, for comparisons).
    The default initialisation is ``r = 0.95`` (:data:`DEFAULT_CLIP_RATIO`).

Gradients (straight-through, LSQ/PACT style; ``u = x / s``)
    - ``d x_hat / d x = 1`` where ``|u| <= 7`` (not clipped), ``0`` where clipped; the max ``m``
      of the row (or group) is treated as a constant (not differentiated), as in dynamic
      quantizers.
    - ``d x_hat / d s = round(u) - u`` inside the range (the LSQ rounding term) and
      ``clamp(round(u), -7, 7) = +-7`` where clipped (the PACT clipping term); then
      ``d s / d r = m / 7`` with the ``m`` of the element's own row (``G = 0``) or group
      (``G > 0``), and ``d r / d theta = r (1 - r)``. The gradient of ``theta`` is the sum over
      all elements (no LSQ gradient rescaling; pick the learning rate instead).

Integer kernels
    The int8 path (:mod:`dbllm_compile.ops_int`, the Triton A4 kernels) implements ``G = 0``
    only; :func:`~dbllm_compile.passes.int_activations.use_int_activations` leaves quantizers
    with ``G > 0`` on the fake-quant path.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ACT_QMAX",
    "DEFAULT_CLIP_RATIO",
    "check_group_size",
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


def check_group_size(k: int, group_size: int) -> None:
    """Raise a ``ValueError`` unless ``group_size`` is an int ``>= 0`` that divides ``k`` (0 always fits).

    Example:
        >>> check_group_size(576, 64)
        >>> check_group_size(576, 0)
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(
            f"activation group size must be an int >= 0 (0 = one scale per token), got {group_size!r}"
        )
    if group_size and k % group_size:
        fits = [g for g in (128, 64, 32, 16, 8) if k % g == 0][:2]
        hint = f" (here e.g. {' or '.join(map(str, fits))})" if fits else ""
        raise ValueError(
            f"activation group size G={group_size} does not divide the feature dimension K={k}: "
            f"choose a G that divides K{hint}, or 0 for one scale per token"
        )


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` as float32 ``[..., K/G, G]`` (``[..., 1, K]`` for ``G = 0``); validates ``G``."""
    k = x.shape[-1]
    check_group_size(k, group_size)
    g = group_size or k
    return x.float().reshape(*x.shape[:-1], k // g if g else 1, g)


def _group_max(xg: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dimension of the grouped ``[..., n, g]``: float32 ``[..., n, 1]``."""
    return xg.abs().amax(dim=-1, keepdim=True)


def _scale(m: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # IEEE division by a tensor, not by the Python number: on CUDA PyTorch divides by a scalar as
    # a multiplication by its reciprocal, which moves s by an ulp and flips codes at ties (so the
    # CPU reference, the CUDA reference and the Triton kernel's div_rn would disagree).
    s = (ratio.float() * m) / torch.full_like(m, float(ACT_QMAX))
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_activation_int(
    x: torch.Tensor, clip_ratio: torch.Tensor, group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer form: ``int8`` codes ``[..., K]`` in ``[-7, 7]`` and float32 scales.

    Args:
        x: activations ``[..., K]`` (any float dtype; computed in float32).
        clip_ratio: ``r`` in ``(0, 1]``, a float32 tensor with one element (not the logit).
        group_size: ``0`` (default): one scale per token, scales ``[..., 1]``; ``G > 0``: one
            scale per token and group of ``G`` contiguous features, scales ``[..., K/G]``
            (``K % G == 0`` or ``ValueError``).

    Example:
        >>> q, s = quantize_activation_int(torch.tensor([[7.0, -3.5, 2.5, 0.0]]), torch.tensor(1.0))
        >>> q.tolist(), s.flatten().tolist()  # -3.5 -> -4 and 2.5 -> 2: half to even
        ([[7, -4, 2, 0]], [1.0])
        >>> q, s = quantize_activation_int(torch.tensor([[7.0, -3.5, 0.7, 0.35]]), torch.tensor(1.0), 2)
        >>> q.tolist(), s.tolist()  # the second group gets its own scale 0.1
        ([[7, -4, 7, 4]], [[1.0, 0.10000000149011612]])
    """
    xg = _grouped(x, group_size)
    s = _scale(_group_max(xg), clip_ratio.reshape(()))
    q = torch.clamp(torch.round(xg / s), -ACT_QMAX, ACT_QMAX)
    return q.to(torch.int8).reshape(x.shape), s.squeeze(-1)  # scales [..., n] ([..., 1] per token)


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` in float32, cast to ``dtype``; ``[..., K]``.

    ``scale`` is ``[..., 1]`` (per token) or ``[..., K/G]`` (per token and group of ``G``
    contiguous features); each code is multiplied by the scale of its row and group.
    """
    n = scale.shape[-1] if scale.dim() else 1
    if n == 1:
        return (codes.float() * scale).to(dtype)
    k = codes.shape[-1]
    if k % n:
        raise ValueError(
            f"dequantize_activation: {n} scales per token do not divide the feature dimension K={k} into "
            f"equal groups (scale shape {tuple(scale.shape)}, codes shape {tuple(codes.shape)})"
        )
    grouped = codes.float().reshape(*codes.shape[:-1], n, k // n) * scale.unsqueeze(-1)
    return grouped.reshape(codes.shape).to(dtype)


def fake_quantize_activation(x: torch.Tensor, clip_ratio: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Quantize-dequantize ``[..., K]`` in the dtype of ``x`` (no autograd; see the ops)."""
    codes, scale = quantize_activation_int(x, clip_ratio, group_size)
    return dequantize_activation(codes, scale, x.dtype)


def straight_through_mask(x: torch.Tensor, clip_ratio: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """bool ``[..., K]``: True where ``|x / s| <= 7`` (the gradient passes), False where clipped."""
    xg = _grouped(x, group_size)
    s = _scale(_group_max(xg), clip_ratio.reshape(()))
    return ((xg / s).abs() <= ACT_QMAX).reshape(x.shape)


def fake_quantize_activation_backward(
    grad_out: torch.Tensor, x: torch.Tensor, clip_logit: torch.Tensor, group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through gradients ``(dL/dx, dL/dtheta)`` of the fake quantizer (module docstring).

    ``grad_out`` and ``x`` are ``[..., K]``; ``dL/dx`` has the dtype of ``x``, ``dL/dtheta``
    the shape and dtype of ``clip_logit``. ``d s / d r = m / 7`` uses the max ``m`` of each
    element's own row (``group_size=0``) or group.
    """
    r = clip_ratio_from_logit(clip_logit)
    xg = _grouped(x, group_size)
    m = _group_max(xg)
    s = _scale(m, r)
    u = xg / s
    inside = u.abs() <= ACT_QMAX
    g = grad_out.float().reshape(xg.shape)
    grad_x = torch.where(inside, g, torch.zeros_like(g)).reshape(x.shape).to(x.dtype)
    d_s = torch.where(inside, torch.round(u) - u, torch.clamp(torch.round(u), -ACT_QMAX, ACT_QMAX))
    d_r = (g * d_s * (m / ACT_QMAX)).sum()
    grad_theta = (d_r * r * (1 - r)).reshape(clip_logit.shape).to(clip_logit.dtype)
    return grad_x, grad_theta
