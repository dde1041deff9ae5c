"""Pure-PyTorch level math and float64 references of the A4 GEMM (:mod:`.a4`).

No Triton here: the kernels are tested against these functions, and the accuracy benchmark
(``benchmarks/a4_int_levels.py``) uses them on CPU.

Level modes (``levels=``), for the weights ``w = a1 * b1 + a2 * b2`` of row ``n``, group ``g``:

``"exact"``
    The levels ``{0, a2, a1, a1 + a2}`` as they are (two int8 products per group in the kernel).
``"group"``
    One step per (row, group): ``t[n, g] = max(|a1|, |a2|, |a1 + a2|) / 127``, integer levels
    ``i1 = rint(a1 / t)``, ``i2 = rint(a2 / t)``, ``w_int = clamp(b1 * i1 + b2 * i2, -127, 127)``
    and ``w ~ t[n, g] * w_int`` (one int8 product per group, rescaled per group).
``"row"``
    One step per output row: ``t[n] = max_g max(|a1|, |a2|, |a1 + a2|) / 127``, the same integer
    levels with ``t[n]`` in place of ``t[n, g]``. ``w_int`` is then an int8 matrix with one scale
    per row, so ``y[m, n] = s_x[m] * t[n] * sum_k q[m, k] * w_int[n, k]`` is ONE integer product
    over all of K (:data:`ROW_MAX_K` bounds K for int32). A group whose levels are much smaller
    than the row's largest gets few integer levels (possibly 0): that is this mode's accuracy
    cost, measured by :func:`int_level_error` and ``benchmarks/a4_int_levels.py``.

All steps and divisions are float32 (IEEE), ``rint`` rounds half to even, a zero step (all
levels 0) is replaced by 1. ``|a / t| <= 127`` so ``|i1|, |i2| <= 127``; only ``i1 + i2`` can
reach 128 (two ties rounded away from zero) and is clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import GpuWeights, _code_shifts

__all__ = ["LEVELS", "ROW_MAX_K", "RowLevels", "check_levels", "check_row_k", "int_levels", "row_int_levels",
           "level_lut", "lut_levels", "prepare_row_levels", "level_scales", "integer_weights", "a4_linear_reference",
           "int_level_error"]

LEVELS = ("exact", "group", "row")
"""The level modes of the A4 GEMM (module docstring); ``"exact"`` is the default everywhere."""

ACT_QMAX = 7   # activation codes are in [-7, 7] (reference.activation)
W_QMAX = 127   # integer weight levels are in [-127, 127]

ROW_MAX_K = (2**31 - 1) // (ACT_QMAX * W_QMAX)
"""Largest K whose row-mode int32 accumulation cannot overflow: every term ``q * w_int`` has
``|q| <= 7`` and ``|w_int| <= 127``, so ``|sum_k q * w_int| <= 889 * K``, and
``889 * K <= 2**31 - 1`` for ``K <= 2,415,617`` (for K = 65,536 the bound is 58,261,504, 2.7% of
the int32 range). Features past K (padding) have zero codes and add nothing."""


def check_levels(levels: str, where: str) -> str:
    """``levels`` if it is one of :data:`LEVELS`, else a ValueError naming ``where``."""
    if levels not in LEVELS:
        raise ValueError(f"{where}: levels={levels!r} is not one of {', '.join(map(repr, LEVELS))} "
                         "('exact': two products per group; 'group': integer levels per group; "
                         "'row': integer levels per output row, one product over K)")
    return levels


def check_row_k(k: int, where: str) -> None:
    """ValueError if ``levels="row"`` could overflow int32 for ``K = k`` (:data:`ROW_MAX_K`)."""
    if k > ROW_MAX_K:
        raise ValueError(f"{where}: in_features={k} > {ROW_MAX_K}: the row-level int32 accumulation could "
                         "overflow (|sum| <= 7 * 127 * K); use levels='group' or 'exact' for this layer")


def _rint_torch(u: torch.Tensor) -> torch.Tensor:
    return torch.round(u)  # half to even, as the kernels' _rint


def _top(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.maximum(a1.abs(), a2.abs()), (a1 + a2).abs())


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


def int_levels(a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``levels="group"``: per (row, group) the step ``t`` and integer levels ``i1, i2``, all
    float32 ``[N, NG]`` (module docstring).

    Example:
        >>> t, i1, i2 = int_levels(torch.tensor([[0.5]]), torch.tensor([[-0.25]]))
        >>> i1.item(), i2.item()
        (127.0, -64.0)
    """
    a1, a2 = a1.float(), a2.float()
    t = _nonzero(_top(a1, a2) / 127.0)
    return t, _rint_torch(a1 / t), _rint_torch(a2 / t)


def row_int_levels(a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``levels="row"``: the step ``t`` float32 ``[N]`` of each output row and the integer
    levels ``i1, i2`` float32 ``[N, NG]`` (module docstring).

    Example:
        >>> t, i1, i2 = row_int_levels(torch.tensor([[0.5, 0.01]]), torch.tensor([[-0.25, 0.0]]))
        >>> i1.tolist(), i2.tolist()
        ([[127.0, 3.0]], [[-64.0, 0.0]])
    """
    a1, a2 = a1.float(), a2.float()
    t = _nonzero(_top(a1, a2).amax(dim=-1) / 127.0)
    return t, _rint_torch(a1 / t[:, None]), _rint_torch(a2 / t[:, None])


def level_lut(i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """The four int8 levels ``(0, i1, i2, clamp(i1 + i2, -127, 127))`` of each group, packed
    little-endian into one int32 (byte ``c`` is the level of code ``c = b1 + 2 * b2``): what the
    row kernel reads. Inverse: :func:`lut_levels`.

    Example:
        >>> lut_levels(level_lut(torch.tensor([100.0]), torch.tensor([-3.0]))).tolist()
        [[0, 100, -3, 97]]
    """
    i1, i2 = i1.to(torch.int64), i2.to(torch.int64)
    if bool(((i1.abs() > W_QMAX) | (i2.abs() > W_QMAX)).any()):
        raise ValueError(f"level_lut: integer levels must lie in [-{W_QMAX}, {W_QMAX}]")
    i12 = (i1 + i2).clamp(-W_QMAX, W_QMAX)
    word = ((i1 & 0xFF) << 8) | ((i2 & 0xFF) << 16) | ((i12 & 0xFF) << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def lut_levels(lut: torch.Tensor) -> torch.Tensor:
    """``int32 [...]`` from :func:`level_lut` -> int64 ``[..., 4]``, the signed level of each code."""
    byte = (lut.to(torch.int64).unsqueeze(-1) >> (8 * torch.arange(4, device=lut.device))) & 0xFF
    return torch.where(byte >= 128, byte - 256, byte)


@dataclass(frozen=True)
class RowLevels:
    """What the row kernel reads besides the codes (derived once per layer from ``gw.scales``).

    Attributes:
        step: float32 ``[N]``, ``t[n]``.
        lut: int32 ``[N, K_alloc/G]``, :func:`level_lut` of each group (0 past the real groups).
    """

    step: torch.Tensor
    lut: torch.Tensor


def prepare_row_levels(gw: GpuWeights) -> RowLevels:
    """:class:`RowLevels` of a layer in the GPU layout, on its device (plain torch ops)."""
    ng = gw.num_groups
    t, i1, i2 = row_int_levels(gw.scales[:, :ng, 0], gw.scales[:, :ng, 1])
    lut = torch.zeros(gw.scales.shape[:2], dtype=torch.int32, device=gw.scales.device)
    lut[:, :ng] = level_lut(i1, i2)
    return RowLevels(t.contiguous(), lut)


def level_scales(a1: torch.Tensor, a2: torch.Tensor, levels: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float32 scales ``(t * i1, t * i2)`` whose dual-binary layer has the integer-level weights
    of ``levels``, and the number of groups where ``i1 + i2`` was clamped (there the level
    ``a1 + a2`` is one step off the kernel's). For ``"exact"``: the scales as they are, 0.

    Lets the reference ops (and a whole model) run with the levels of the integer kernels.
    """
    check_levels(levels, "level_scales")
    if levels == "exact":
        return a1.float(), a2.float(), 0
    if levels == "group":
        t, i1, i2 = int_levels(a1, a2)
    else:
        t, i1, i2 = row_int_levels(a1, a2)
        t = t[:, None]
    clamped = int(((i1 + i2).abs() > W_QMAX).sum())
    return t * i1, t * i2, clamped


def _codes(gw: GpuWeights) -> torch.Tensor:
    """2-bit codes ``[N, K_pad]`` (int64) of the GPU layout."""
    q = gw.qweight[:, : gw.k_pad // 16].to(torch.int64) & 0xFFFFFFFF
    return ((q.unsqueeze(-1) >> _code_shifts(q.device)) & 3).reshape(q.shape[0], gw.k_pad)


def _integer_weights(codes: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor,
                     levels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes [N, NG, G]`` -> ``w_int`` float64 ``[N, NG, G]`` and its step float64 ``[N, NG]``."""
    if levels == "group":
        t, i1, i2 = int_levels(a1, a2)
    else:
        t, i1, i2 = row_int_levels(a1, a2)
        t = t[:, None].expand_as(i1)
    b1, b2 = (codes & 1).double(), (codes >> 1).double()
    w = (b1 * i1.double()[..., None] + b2 * i2.double()[..., None]).clamp(-W_QMAX, W_QMAX)
    return w, t.double()


def integer_weights(gw: GpuWeights, levels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``levels`` ``"group"`` or ``"row"``: the integer weights ``w_int`` (float64 ``[N, K_pad]``,
    integers in ``[-127, 127]``) and their step (float64 ``[N, NG]``; for ``"row"`` every group of
    a row holds the row's step), so that ``w ~ w_int * step`` per group."""
    if check_levels(levels, "integer_weights") == "exact":
        raise ValueError("integer_weights: levels='exact' has no integer weights; use 'group' or 'row'")
    ng, g = gw.num_groups, gw.group_size
    w, t = _integer_weights(_codes(gw).reshape(-1, ng, g), gw.scales[:, :ng, 0].float(), gw.scales[:, :ng, 1].float(),
                            levels)
    return w.reshape(w.shape[0], -1), t


def a4_linear_reference(codes_x: torch.Tensor, scale_x: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None,
                        levels: str = "exact") -> torch.Tensor:
    """Float64 evaluation of the kernels' formula for ``levels`` (module docstring) from the int8
    codes ``[M, >= K_pad]`` and scales ``[M]`` of the activations; returns float64 ``[M, N]``.

    Integer sums are exact in float64 (``|sum| < 2**53``), so this differs from exact arithmetic
    only by the float64 rounding of the scaling.
    """
    check_levels(levels, "a4_linear_reference")
    k_pad, g, ng = gw.k_pad, gw.group_size, gw.num_groups
    codes = _codes(gw).reshape(-1, ng, g)
    q = codes_x[:, :k_pad].double().reshape(-1, ng, g)
    a1 = gw.scales[:, :ng, 0].float()
    a2 = gw.scales[:, :ng, 1].float()
    if levels == "exact":
        b1, b2 = (codes & 1).double(), (codes >> 1).double()
        y = (torch.einsum("mgk,ngk->mng", q, b1) * a1.double()[None]
             + torch.einsum("mgk,ngk->mng", q, b2) * a2.double()[None]).sum(-1)
    elif levels == "group":
        w, t = _integer_weights(codes, a1, a2, levels)
        y = (torch.einsum("mgk,ngk->mng", q, w) * t[None]).sum(-1)
    else:  # one integer sum over all of K, one scale per row
        w, t = _integer_weights(codes, a1, a2, levels)
        y = (q.reshape(q.shape[0], -1) @ w.reshape(w.shape[0], -1).T) * t[:, 0][None]
    y = y * scale_x.double()[:, None]
    if bias is not None:
        y = y + bias.double()[None]
    return y


def int_level_error(gw: GpuWeights, levels: str = "group") -> dict[str, float]:
    """How far the integer-level weights of ``levels`` are from the exact ones, in units of the
    layer's norm (0 for ``"exact"``).

    Returns ``{"rel_level_error": ||t * w_int - w_hat|| / ||w_hat||, "max_abs_level_error": ...}``
    over the real groups (``w_hat = a1 * b1 + a2 * b2`` from the layout's scales, float32).
    """
    check_levels(levels, "int_level_error")
    ng, g = gw.num_groups, gw.group_size
    codes = _codes(gw).reshape(-1, ng, g)
    a1 = gw.scales[:, :ng, 0].float()
    a2 = gw.scales[:, :ng, 1].float()
    exact = ((codes & 1).float() * a1[..., None] + (codes >> 1).float() * a2[..., None]).double()
    if levels == "exact":
        diff = torch.zeros_like(exact)
    else:
        w, t = _integer_weights(codes, a1, a2, levels)
        diff = w * t[..., None] - exact
    return {"rel_level_error": float(diff.norm() / exact.norm().clamp_min(1e-30)),
            "max_abs_level_error": float(diff.abs().max())}
