"""Sign codebook (LBLLM) initialisation: symmetric levels ``{-s_hi, -s_lo, s_lo, s_hi}`` per group.

The levels are the dual-binary form plus a per-group offset (see
:mod:`dbllm_compile.reference.dual_binary`, which assigns bits and dequantizes for any ``c``):

    w_hat = a1 * b1 + a2 * b2 + c,    c = -s_hi,  a1 = s_hi - s_lo,  a2 = s_hi + s_lo

:func:`init_sign_scales` picks ``(s_lo, s_hi)`` per group and optionally refines ``(a1, a2, c)``
as three free parameters (what ``DBLLMConfig(codebook="sign")`` then trains). All arithmetic is
float32 (the refit solves its 3x3 systems in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbllm_compile.reference.dual_binary import _pad_groups, assign_bits, check_weight, fake_quantize_weight

__all__ = ["SIGN_RATIOS", "SignInitResult", "init_sign_scales"]


@dataclass(frozen=True)
class SignInitResult:
    """Initial sign-codebook parameters of one layer (all float32 ``[N, n_groups]``).

    Attributes:
        a1, a2, c: the ``a1 * b1 + a2 * b2 + c`` form of the levels ``{-s_hi, -s_lo, s_lo, s_hi}``.
        s_lo, s_hi: the two magnitudes, ``0 <= s_lo <= s_hi``.
        mse: mean squared error of each group at init.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    c: torch.Tensor
    s_lo: torch.Tensor
    s_hi: torch.Tensor
    mse: torch.Tensor


SIGN_RATIOS = (0.125, 0.25, 1 / 3, 0.375, 0.5, 0.625, 0.75, 0.875)
"""Candidate ``s_lo / s_hi`` of :func:`init_sign_scales` (1/3 is the uniform 4-level grid)."""


def _least_squares_refit_offset(
    w: torch.Tensor, real: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
    a1: torch.Tensor, a2: torch.Tensor, c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group least-squares ``(a1, a2, c)`` for fixed bits (columns ``b1, b2, 1`` over the real,
    non-padded positions ``real``); keeps the old triple where the 3x3 system is singular."""
    b1 = b1.double()
    b2 = b2.double()
    one = real.double().expand_as(b1)
    wd = w.double()
    cols = (b1, b2, one)
    gram = torch.stack([torch.stack([(u * v).sum(-1) for v in cols], -1) for u in cols], -2)  # [R, g, 3, 3]
    rhs = torch.stack([(wd * u).sum(-1) for u in cols], -1)  # [R, g, 3]
    det = torch.linalg.det(gram)
    ok = det.abs() > 0.5  # integer counts: 0 means the columns are dependent
    eye = torch.eye(3, dtype=gram.dtype).expand_as(gram)
    sol = torch.linalg.solve(torch.where(ok[..., None, None], gram, eye), rhs).float()
    return (torch.where(ok, sol[..., 0], a1), torch.where(ok, sol[..., 1], a2), torch.where(ok, sol[..., 2], c))


def _sign_grid_search(mag: torch.Tensor, top: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_hi, s_lo)`` ``[R, g, 1]`` of least squared error over the grid of :func:`init_sign_scales`.

    ``mag`` is ``|w|`` ``[R, g, G]`` (padding zeros included, as in the binary grid search). The
    error of a candidate is computed from prefix sums of the sorted magnitudes, in float64:
    with ``j`` the number of magnitudes below the midpoint ``(s_lo + s_hi) / 2``,
    ``err = sum_{i<j} (m_i - s_lo)^2 + sum_{i>=j} (m_i - s_hi)^2``, expanded into
    ``S2 - 2 s S1 + count s^2`` terms: O(log G) per group and candidate instead of O(G).
    Ties keep the first candidate (``t`` ascending, then :data:`SIGN_RATIOS` order).
    """
    sorted_mag = mag.sort(dim=-1).values.contiguous()
    m64 = sorted_mag.double()
    zero = torch.zeros_like(m64[..., :1])
    s1 = torch.cat([zero, m64.cumsum(-1)], -1)  # [R, g, G+1]: s1[j] = sum of the j smallest
    s2 = torch.cat([zero, m64.square().cumsum(-1)], -1)
    tot1, tot2, size = s1[..., -1:], s2[..., -1:], mag.shape[-1]
    rhos = torch.tensor(SIGN_RATIOS, dtype=torch.float64)
    top64 = top.double()
    best_err = torch.full_like(top64, float("inf"))
    best_hi = torch.zeros_like(top64)
    best_lo = torch.zeros_like(top64)
    for t in torch.linspace(1.0 / points, 1.0, points).tolist():
        hi32 = top * t  # [R, g, 1], float32 as the levels are stored
        lo32 = hi32 * rhos.float()  # [R, g, n_rho]
        j = torch.searchsorted(sorted_mag, (lo32 + hi32) * 0.5)  # magnitudes strictly below the midpoint
        hi, lo = hi32.double(), lo32.double()
        below1, below2 = s1.gather(-1, j), s2.gather(-1, j)
        err = (below2 - 2 * lo * below1 + j * lo.square()) + (
            (tot2 - below2) - 2 * hi * (tot1 - below1) + (size - j) * hi.square())
        err_min, idx = err.min(dim=-1, keepdim=True)  # first ratio among equals
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best_hi = torch.where(better, hi, best_hi)
        best_lo = torch.where(better, lo.gather(-1, idx), best_lo)
    return best_hi.float(), best_lo.float()


@torch.no_grad()
def init_sign_scales(
    weight: torch.Tensor, group_size: int, *, method: str = "mse", grid_points: int = 48,
    refine_iters: int = 0, name: str = "weight",
) -> SignInitResult:
    """Sign-codebook init: per group, ``(s_lo, s_hi)`` minimising the squared error.

    ``method="mse"``, grid search: ``s_hi = t * max|w|`` for ``grid_points`` values of ``t`` in
    ``(0, 1]`` times ``s_lo = rho * s_hi`` for ``rho`` in :data:`SIGN_RATIOS`; each weight takes
    the nearest of the four levels (``|w| < (s_lo + s_hi) / 2`` -> ``s_lo``, sign of ``w``, 0
    counted positive). ``method="maxabs"``: the naive ``s_hi = max|w|``, ``s_lo = s_hi / 3``
    (the uniform grid just covering the range). Zero groups get all-zero parameters.
    ``refine_iters`` then alternates a least-squares fit of ``(a1, a2, c)`` to the bits (three
    free parameters per group: the levels stop being symmetric) and a nearest-level
    re-assignment on ``w - c``; each step can only lower the error. ``s_lo``, ``s_hi`` are
    those of the symmetric start.

    Example:
        >>> r = init_sign_scales(torch.randn(8, 128), 64)
        >>> bool(((r.a1 + r.a2 + 2 * r.c).abs() < 1e-6).all())  # symmetric: c = -(a1 + a2) / 2
        True
    """
    check_weight(weight, name)
    n, k = weight.shape
    w = _pad_groups(weight.detach(), group_size)  # [N, g, G]
    mag = w.abs()
    top = mag.amax(dim=-1, keepdim=True)
    if method == "maxabs":
        best_hi, best_lo = top, top / 3
    elif method == "mse":
        best_hi, best_lo = _sign_grid_search(mag, top, grid_points)
    else:
        raise ValueError(f"unknown init method {method!r}; use 'mse' or 'maxabs'")
    s_hi, s_lo = best_hi.squeeze(-1), best_lo.squeeze(-1)
    a1, a2, c = s_hi - s_lo, s_hi + s_lo, -s_hi
    if refine_iters:
        real = (torch.arange(w.shape[1] * group_size) < k).reshape(1, -1, group_size)
        for _ in range(refine_iters):
            b1, b2 = assign_bits(weight, a1, a2, group_size, c)
            a1, a2, c = _least_squares_refit_offset(
                w, real, b1.reshape(w.shape), b2.reshape(w.shape), a1, a2, c)
    w_hat = fake_quantize_weight(weight, a1, a2, group_size, c)
    err = torch.nn.functional.pad(weight.float() - w_hat, (0, w.shape[1] * group_size - k))
    return SignInitResult(a1, a2, c, s_lo, s_hi, err.reshape(w.shape).square().mean(-1))
