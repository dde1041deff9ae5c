"""Dual-binary reference math: initialisation, nearest-level thresholds, edge cases."""

import pytest
import torch

from dbllm_compile.errors import QuantizationError
from dbllm_compile.reference import (
    assign_bits,
    dequantize_bits,
    fake_quantize_weight,
    init_scales,
)

G = 64


def _nearest_on_grid(w, s, mirrored):
    """Independent nearest rounding (half up) onto {-s,0,s,2s} or {-2s,-s,0,s}, per group."""
    n, k = w.shape
    wg = w.reshape(n, -1, G)
    s = s.unsqueeze(-1)
    lo = torch.where(mirrored, -2, -1).unsqueeze(-1)
    hi = torch.where(mirrored, 1, 2).unsqueeze(-1)
    q = torch.minimum(torch.maximum(torch.floor(wg / s + 0.5), lo), hi) * s
    return q.reshape(n, k)


def _paper_thresholds(w, a1, a2):
    """DB-LLM's two Heaviside thresholds, for the up-oriented grid (a1 > 0 > a2)."""
    n, k = w.shape
    wg = w.reshape(n, -1, G)
    a1 = a1.unsqueeze(-1)
    a2 = a2.unsqueeze(-1)
    b1 = (wg - (a1 + a2) / 2 >= 0).float()
    b2 = (-(wg - a1 * b1 - a2 / 2) >= 0).float()
    return (a1 * b1 + a2 * b2).reshape(n, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_init_is_nearest_rounding_on_the_chosen_grid(seed):
    torch.manual_seed(seed)
    w = torch.randn(32, 4 * G) * 0.05 + torch.randn(32, 1) * 0.01
    r = init_scales(w, G)
    s = r.a2.abs()
    # The pair is a uniform grid of the chosen orientation...
    assert torch.allclose(r.a1, torch.where(r.mirrored, -2 * s, 2 * s))
    # ... and the bits are exactly nearest rounding on it.
    w_hat = fake_quantize_weight(w, r.a1, r.a2, G)
    assert torch.equal(w_hat, _nearest_on_grid(w, s, r.mirrored))
    assert r.mirrored.any() and (~r.mirrored).any()  # both orientations get used


def test_paper_thresholds_agree_with_nearest_level_on_up_grid():
    torch.manual_seed(3)
    w = torch.randn(16, 2 * G)
    s = w.reshape(16, -1, G).abs().amax(-1) / 2
    a1, a2 = 2 * s, -s
    assert torch.equal(fake_quantize_weight(w, a1, a2, G), _paper_thresholds(w, a1, a2))


def test_assignment_is_nearest_for_free_scales():
    torch.manual_seed(4)
    w = torch.randn(8, G)
    a1 = torch.randn(8, 1)
    a2 = torch.randn(8, 1)  # arbitrary: level pairs may interleave
    w_hat = fake_quantize_weight(w, a1, a2, G)
    levels = torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], -1)  # [8,1,4]
    best = (w.unsqueeze(-1) - levels).abs().amin(-1)
    assert torch.allclose((w - w_hat).abs(), best)


def test_mse_init_beats_maxabs_and_refinement_never_hurts():
    torch.manual_seed(5)
    w = torch.randn(64, 4 * G) * 0.02
    mse = init_scales(w, G).mse.mean()
    naive = init_scales(w, G, method="maxabs").mse.mean()
    refined = init_scales(w, G, refine_iters=3).mse.mean()
    assert mse < 0.8 * naive
    assert refined <= mse * (1 + 1e-6)


def test_zero_and_constant_groups_are_exact():
    w = torch.zeros(4, 3 * G)
    w[1, G : 2 * G] = 0.37  # positive constant group
    w[2, :G] = -1.25  # negative constant group
    w[3] = torch.randn(3 * G)
    r = init_scales(w, G)
    assert torch.all(torch.isfinite(r.a1)) and torch.all(torch.isfinite(r.a2))
    w_hat = fake_quantize_weight(w, r.a1, r.a2, G)
    assert torch.equal(w_hat[:3], w[:3])
    assert r.a1[0].abs().sum() == 0 and r.a2[0].abs().sum() == 0
    b1, b2 = assign_bits(w, r.a1, r.a2, G)
    assert b1[0].sum() == 0 and b2[0].sum() == 0  # zero groups store no set bits


@pytest.mark.parametrize("k", [1, 10, G - 1, G + 1, 3 * G + 17])
def test_padding_of_in_features(k):
    torch.manual_seed(k)
    w = torch.randn(5, k)
    r = init_scales(w, G)
    n_groups = -(-k // G)
    assert r.a1.shape == (5, n_groups)
    b1, b2 = assign_bits(w, r.a1, r.a2, G)
    assert b1.shape == (5, n_groups * G)
    assert b1[:, k:].sum() == 0 and b2[:, k:].sum() == 0
    w_hat = dequantize_bits(b1, b2, r.a1, r.a2, G)[:, :k]
    assert torch.equal(w_hat, fake_quantize_weight(w, r.a1, r.a2, G))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_weight_dtypes_give_float32_scales(dtype):
    torch.manual_seed(0)
    w32 = torch.randn(8, 2 * G)
    w = w32.to(dtype)
    r = init_scales(w, G)
    assert r.a1.dtype == torch.float32
    # Same result as initialising from the upcast weight.
    r_ref = init_scales(w.float(), G)
    assert torch.equal(r.a1, r_ref.a1) and torch.equal(r.a2, r_ref.a2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_names_the_layer(bad):
    w = torch.randn(4, G)
    w[2, 5] = bad
    with pytest.raises(QuantizationError, match=r"model\.layers\.7\.mlp\.up_proj.*\(2, 5\).*exclude"):
        init_scales(w, G, name="model.layers.7.mlp.up_proj")


def test_bad_rank_and_dtype_are_clear_errors():
    with pytest.raises(QuantizationError, match="2-D"):
        init_scales(torch.randn(4, 4, 4), G, name="conv")
    with pytest.raises(QuantizationError, match="dtype torch.int8"):
        init_scales(torch.zeros(4, G, dtype=torch.int8), G, name="int_layer")
