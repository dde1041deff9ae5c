"""Pure-PyTorch level math and float64 references of the A4 GEMM (:mod:`.a4`).

No Triton here: the kernels are tested against these functions, and the accuracy benchmark
(``benchmarks/a4_int_levels.py``) uses them on CPU. The formulas are documented in :mod:`.a4`.
"""

from __future__ import annotations

import torch

from .layout import GpuWeights, _code_shifts

__all__ = ["int_levels", "a4_linear_reference", "int_level_error"]


def _rint_torch(u: torch.Tensor) -> torch.Tensor:
    return torch.round(u)  # half to even, as the kernels' _rint


def int_levels(a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, group): step ``t`` and integer levels ``i1, i2`` of the INT_LEVELS form (float32)."""
    a1, a2 = a1.float(), a2.float()
    top = torch.maximum(torch.maximum(a1.abs(), a2.abs()), (a1 + a2).abs())
    t = top / 127.0
    t = torch.where(t > 0, t, torch.ones_like(t))
    return t, _rint_torch(a1 / t), _rint_torch(a2 / t)


def _codes(gw: GpuWeights) -> torch.Tensor:
    """2-bit codes ``[N, K_pad]`` (int64) of the GPU layout."""
    q = gw.qweight[:, : gw.k_pad // 16].to(torch.int64) & 0xFFFFFFFF
    return ((q.unsqueeze(-1) >> _code_shifts(q.device)) & 3).reshape(q.shape[0], gw.k_pad)


def a4_linear_reference(codes_x: torch.Tensor, scale_x: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None,
                        int_levels_mode: bool = False) -> torch.Tensor:
    """Float64 evaluation of the kernel's formula (:mod:`.a4` docstring) from the int8 codes
    ``[M, >= K_pad]`` and scales ``[M]`` of the activations; returns float64 ``[M, N]``."""
    k_pad, g, ng = gw.k_pad, gw.group_size, gw.num_groups
    codes = _codes(gw).reshape(-1, ng, g)
    b1, b2 = (codes & 1).double(), (codes >> 1).double()
    q = codes_x[:, :k_pad].double().reshape(-1, ng, g)
    a1 = gw.scales[:, :ng, 0].float()
    a2 = gw.scales[:, :ng, 1].float()
    if int_levels_mode:
        t, i1, i2 = int_levels(a1, a2)
        w = (b1 * i1.double()[..., None] + b2 * i2.double()[..., None]).clamp(-127, 127)
        per_group = torch.einsum("mgk,ngk->mng", q, w) * t.double()[None]
    else:
        per_group = (torch.einsum("mgk,ngk->mng", q, b1) * a1.double()[None]
                     + torch.einsum("mgk,ngk->mng", q, b2) * a2.double()[None])
    y = per_group.sum(-1) * scale_x.double()[:, None]
    if bias is not None:
        y = y + bias.double()[None]
    return y


def int_level_error(gw: GpuWeights) -> dict[str, float]:
    """How far the INT_LEVELS weights are from the exact levels, in units of the layer's norm.

    Returns ``{"rel_level_error": ||w_int * t - w_hat|| / ||w_hat||, "max_abs_level_error": ...}``.
    """
    ng, g = gw.num_groups, gw.group_size
    codes = _codes(gw).reshape(-1, ng, g)
    b1, b2 = (codes & 1).float(), (codes >> 1).float()
    a1 = gw.scales[:, :ng, 0].float()[..., None]
    a2 = gw.scales[:, :ng, 1].float()[..., None]
    exact = b1 * a1 + b2 * a2
    t, i1, i2 = int_levels(a1[..., 0], a2[..., 0])
    approx = (b1 * i1[..., None] + b2 * i2[..., None]).clamp(-127, 127) * t[..., None]
    diff = approx - exact
    return {"rel_level_error": float(diff.norm() / exact.norm().clamp_min(1e-30)),
            "max_abs_level_error": float(diff.abs().max())}
