"""Flexible Dual Binarization (DB-LLM), reference implementation.

A weight row is split into groups of ``G`` consecutive input features. Each group ``g`` of
output channel ``n`` has two scales ``a1[n, g]``, ``a2[n, g]`` and every weight is

    w_hat = a1 * b1 + a2 * b2,        b1, b2 in {0, 1}

so a group has the four levels ``{0, a2, a1, a1 + a2}``.

Bit assignment (:func:`assign_bits`) is *nearest level*: the four levels of a group are sorted,
the three midpoints between neighbours are the thresholds, and a weight takes the level of the
interval it falls in; a weight exactly on a midpoint takes the upper level (round half up);
of equal levels the one with fewer set bits is used.
At initialisation the levels are a uniform grid (``a1 = 2s, a2 = -s`` gives ``{-s, 0, s, 2s}``;
the mirrored grid ``a1 = -2s, a2 = s`` gives ``{-2s, -s, 0, s}``), and the thresholds are
exactly DB-LLM's ``b1 = H(w - (a1 + a2)/2)``, ``b2 = H(-(w - a1*b1 - a2/2))``, i.e. nearest
rounding on that grid. Once ``a1, a2`` are learned freely the paper's two-threshold formula
stops being nearest (the level pairs can interleave); sorted midpoints stay nearest for any
``a1, a2``.

Sign codebook (LBLLM): symmetric levels ``{-s_hi, -s_lo, s_lo, s_hi}`` per group are the same
form plus a per-group offset ``c``:

    w_hat = a1 * b1 + a2 * b2 + c,    c = -s_hi,  a1 = s_hi - s_lo,  a2 = s_hi + s_lo

(codes 00 -> -s_hi, 10 -> -s_lo, 01 -> s_lo, 11 -> s_hi: b2 is the sign bit and b1 XOR b2 selects
the low magnitude). Every function here takes an optional ``c`` (``[N, n_groups]``; ``None``
means 0, the {0,1} form); bits are assigned by nearest level on ``w - c``.
:func:`dbllm_compile.reference.sign_codebook.init_sign_scales` initialises the sign form.

All arithmetic is float32 whatever the weight dtype. ``in_features`` that are not a multiple of
``G`` are zero-padded to ``K_pad``; padded positions always get bits 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbllm_compile.errors import QuantizationError

__all__ = [
    "InitResult",
    "assign_bits",
    "check_weight",
    "dequantize_bits",
    "fake_quantize_weight",
    "group_levels",
    "init_scales",
    "num_groups",
    "padded_in_features",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_groups(in_features: int, group_size: int) -> int:
    """Number of scale groups along the input dimension (the last one may be padded)."""
    return -(-in_features // group_size)


def padded_in_features(in_features: int, group_size: int) -> int:
    """``in_features`` rounded up to a multiple of ``group_size``."""
    return num_groups(in_features, group_size) * group_size


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`QuantizationError` unless ``weight`` is a finite 2-D float tensor.

    ``name`` (the layer's module name) is put into the message so the user knows which
    layer to fix or exclude.
    """
    if weight.dim() != 2:
        raise QuantizationError(
            f"layer {name!r}: expected a 2-D [out_features, in_features] weight, got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise QuantizationError(
            f"layer {name!r}: weight dtype {weight.dtype} is not supported; expected one of "
            f"float32, float16, bfloat16 (dequantize the checkpoint first)"
        )
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(torch.isinf(weight).sum())
        first = tuple(int(i) for i in bad[0])
        raise QuantizationError(
            f"layer {name!r}: weight has {n_nan} NaN and {n_inf} Inf values (first at index "
            f"{first}); repair the checkpoint or keep this layer in full precision with "
            f"DBLLMConfig(exclude=[{name!r}])"
        )


def _pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 ``[N, K]`` -> ``[N, n_groups, G]``, zero-padded."""
    n, k = w.shape
    pad = padded_in_features(k, group_size) - k
    w = w.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)


def group_levels(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The four levels ``[..., 4]`` of every group, in code order ``{0, a2, a1, a1 + a2}``."""
    return torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], dim=-1)


def assign_bits(
    weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group_size: int,
    c: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level bits of a weight for given scales.

    Args:
        weight: ``[N, K]`` latent weight (any float dtype).
        a1, a2: ``[N, n_groups]`` scales (used as float32).
        group_size: ``G``.
        c: optional ``[N, n_groups]`` offset (sign codebook); bits are those of ``w - c``.

    Returns:
        ``(b1, b2)``, ``uint8 {0,1}`` of shape ``[N, K_pad]``; padded positions are 0.
    """
    n, k = weight.shape
    w = _pad_groups(weight, group_size)  # [N, g, G]
    if c is not None:
        w = w - c.float().unsqueeze(-1)
    levels = group_levels(a1.float(), a2.float())  # [N, g, 4]
    # A stable sort keeps the code order among equal levels, so ties are deterministic.
    sorted_levels, order = torch.sort(levels, dim=-1, stable=True)
    mids = (sorted_levels[..., 1:] + sorted_levels[..., :-1]) * 0.5  # [N, g, 3]
    # Among equal levels take the first in code order (fewest set bits): zero groups store 0s.
    # Resolved on the small per-group table: code_of_rank[r] = code of the first sorted level
    # equal to level r.
    code_of_rank = order.clone()
    for r in (1, 2, 3):
        same = sorted_levels[..., r] == sorted_levels[..., r - 1]
        code_of_rank[..., r] = torch.where(same, code_of_rank[..., r - 1], order[..., r])
    code_of_rank = code_of_rank.to(torch.uint8)
    # rank = number of midpoints at or below w (0..3); code = code_of_rank[rank], done with
    # elementwise selects instead of per-element gathers (the hot path of the training op).
    ge0 = w >= mids[..., 0:1]
    ge1 = w >= mids[..., 1:2]
    ge2 = w >= mids[..., 2:3]
    code = torch.where(
        ge1,
        torch.where(ge2, code_of_rank[..., 3:4], code_of_rank[..., 2:3]),
        torch.where(ge0, code_of_rank[..., 1:2], code_of_rank[..., 0:1]),
    )
    # Level codes follow the order {0, a2, a1, a1 + a2}, so code = 2 * b1 + b2.
    b1 = (code >> 1).reshape(n, -1)
    b2 = (code & 1).reshape(n, -1)
    if b1.shape[1] != k:
        b1[:, k:] = 0
        b2[:, k:] = 0
    return b1, b2


def dequantize_bits(
    b1: torch.Tensor, b2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group_size: int,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_hat = a1 * b1 + a2 * b2 (+ c)`` in float32, shape ``[N, K_pad]``.

    ``a1, a2`` and the optional offset ``c`` are ``[N, n_groups]`` (any float dtype, upcast to
    float32 first); ``b1, b2`` are ``[N, K_pad]`` {0,1}. With ``c`` the padded positions hold
    ``c`` (callers slice ``[:, :K]``); without it they are 0. This is the one definition of the dequantized weight:
    the training op, the deploy op and the kernels' reference all call it.
    """
    n, k_pad = b1.shape
    g1 = b1.reshape(n, -1, group_size).float()
    g2 = b2.reshape(n, -1, group_size).float()
    w = a1.float().unsqueeze(-1) * g1 + a2.float().unsqueeze(-1) * g2
    if c is not None:
        w = w + c.float().unsqueeze(-1)
    return w.reshape(n, k_pad)


def fake_quantize_weight(
    weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group_size: int,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize: float32 ``[N, K]`` made of the nearest levels (no gradient)."""
    b1, b2 = assign_bits(weight, a1, a2, group_size, c)
    return dequantize_bits(b1, b2, a1, a2, group_size, c)[:, : weight.shape[1]]


@dataclass(frozen=True)
class InitResult:
    """Initial scales of one layer.

    Attributes:
        a1, a2: float32 ``[N, n_groups]``.
        mirrored: bool ``[N, n_groups]``, True where the grid {-2s, -s, 0, s} was chosen.
        mse: float32 ``[N, n_groups]`` mean squared error of each group at init.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    mirrored: torch.Tensor
    mse: torch.Tensor


def _grid_quantize(w: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest rounding (half up) of ``w`` onto ``s * {lo..hi}``; ``s`` may be 0."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.floor(w / safe + 0.5), lo, hi) * s


def _mse_grid_search(w: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group step and orientation minimising the squared error. ``w``: ``[R, g, G]``."""
    wmax = w.amax(dim=-1, keepdim=True)
    wmin = w.amin(dim=-1, keepdim=True)
    # Steps at which each grid just covers the group's range; candidates shrink from there.
    s0_up = torch.maximum(wmax * 0.5, -wmin).clamp_min(0)  # levels {-s, 0, s, 2s}
    s0_dn = torch.maximum(wmax, -wmin * 0.5).clamp_min(0)  # levels {-2s, -s, 0, s}
    best_err = torch.full_like(wmax, float("inf"))
    best_s = torch.zeros_like(wmax)
    best_mirror = torch.zeros_like(wmax, dtype=torch.bool)
    for t in torch.linspace(1.0 / points, 1.0, points).tolist():
        for mirror, s0, lo, hi in ((False, s0_up, -1, 2), (True, s0_dn, -2, 1)):
            s = s0 * t
            err = (w - _grid_quantize(w, s, lo, hi)).square().sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_mirror = torch.where(better, torch.full_like(better, mirror), best_mirror)
    return best_s.squeeze(-1), best_mirror.squeeze(-1), best_err.squeeze(-1)


def _least_squares_refit(
    w: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group least-squares ``(a1, a2)`` for fixed bits; keeps the old pair where singular."""
    b1 = b1.float()
    b2 = b2.float()
    s11 = b1.sum(-1)
    s22 = b2.sum(-1)
    s12 = (b1 * b2).sum(-1)
    r1 = (w * b1).sum(-1)
    r2 = (w * b2).sum(-1)
    det = s11 * s22 - s12 * s12
    ok = det > 0.5  # det is an integer count; 0 means the planes are not independent
    safe = torch.where(ok, det, torch.ones_like(det))
    new1 = (s22 * r1 - s12 * r2) / safe
    new2 = (s11 * r2 - s12 * r1) / safe
    return torch.where(ok, new1, a1), torch.where(ok, new2, a2)


@torch.no_grad()
def init_scales(
    weight: torch.Tensor,
    group_size: int,
    *,
    method: str = "mse",
    grid_points: int = 48,
    refine_iters: int = 0,
    name: str = "weight",
    max_chunk_elements: int = 1 << 23,
) -> InitResult:
    """Initial ``(a1, a2)`` of a weight, by group.

    ``method="mse"``: for each group, try ``grid_points`` steps ``s = t * s0`` (``t`` in
    ``(0, 1]``, ``s0`` the step at which the grid just covers the group's range) for both
    orientations and keep the pair with the least squared error of nearest rounding.
    ``method="maxabs"``: ``s = max|w| / 2`` on the grid {-s, 0, s, 2s}.
    ``refine_iters`` then alternates a least-squares fit of ``(a1, a2)`` to the bits and a
    nearest-level re-assignment; each step can only lower the error.

    Zero groups get ``a1 = a2 = 0``; constant groups are represented exactly.

    Example:
        >>> w = torch.randn(8, 128)
        >>> r = init_scales(w, 64)
        >>> r.a1.shape
        torch.Size([8, 2])
    """
    check_weight(weight, name)
    n, k = weight.shape
    grouped = _pad_groups(weight.detach(), group_size)  # [N, g, G] float32
    rows_per_chunk = max(1, max_chunk_elements // max(1, grouped.shape[1] * group_size))
    a1s, a2s, mirrors, errs = [], [], [], []
    for start in range(0, n, rows_per_chunk):
        w = grouped[start : start + rows_per_chunk]
        if method == "mse":
            s, mirror, _ = _mse_grid_search(w, grid_points)
        elif method == "maxabs":
            s = w.abs().amax(dim=-1) * 0.5
            mirror = torch.zeros_like(s, dtype=torch.bool)
        else:
            raise ValueError(f"unknown init method {method!r}; use 'mse' or 'maxabs'")
        a1 = torch.where(mirror, -2 * s, 2 * s)
        a2 = torch.where(mirror, s, -s)
        flat = w.reshape(w.shape[0], -1)[:, :k]
        for _ in range(refine_iters):
            b1, b2 = assign_bits(flat, a1, a2, group_size)
            shape = (w.shape[0], -1, group_size)
            a1, a2 = _least_squares_refit(w, b1.reshape(shape), b2.reshape(shape), a1, a2)
        w_hat = fake_quantize_weight(flat, a1, a2, group_size)
        err = torch.nn.functional.pad(flat - w_hat, (0, grouped.shape[-1] * grouped.shape[1] - k))
        errs.append(err.reshape(w.shape).square().mean(-1))
        a1s.append(a1)
        a2s.append(a2)
        mirrors.append(mirror)
    return InitResult(torch.cat(a1s), torch.cat(a2s), torch.cat(mirrors), torch.cat(errs))
