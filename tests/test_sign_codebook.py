"""The sign codebook (LBLLM): a1*b1 + a2*b2 + c, symmetric levels, MSE init."""

import pytest
import torch

from dbllm_compile.reference import assign_bits, dequantize_bits, init_scales
from dbllm_compile.reference.dual_binary import fake_quantize_weight
from dbllm_compile.reference.sign_codebook import init_sign_scales

G = 64


def _w(n=16, k=200, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_offset_none_is_the_fdb_form_bit_for_bit():
    w = _w()
    r = init_scales(w, G)
    b1, b2 = assign_bits(w, r.a1, r.a2, G)
    assert torch.equal(dequantize_bits(b1, b2, r.a1, r.a2, G), dequantize_bits(b1, b2, r.a1, r.a2, G, None))
    zero = torch.zeros_like(r.a1)
    assert torch.equal(assign_bits(w, r.a1, r.a2, G, zero)[0], b1)
    assert torch.equal(fake_quantize_weight(w, r.a1, r.a2, G, zero), fake_quantize_weight(w, r.a1, r.a2, G))


def test_codes_map_to_symmetric_levels():
    lo, hi = torch.tensor([[0.25]]), torch.tensor([[1.0]])
    a1, a2, c = hi - lo, hi + lo, -hi
    b1 = torch.tensor([[0, 1, 0, 1] + [0] * (G - 4)], dtype=torch.uint8)
    b2 = torch.tensor([[0, 0, 1, 1] + [0] * (G - 4)], dtype=torch.uint8)
    assert dequantize_bits(b1, b2, a1, a2, G, c)[0, :4].tolist() == [-1.0, -0.25, 0.25, 1.0]
    # nearest level on w - c, midpoints -0.625, 0, 0.625 (ties go up)
    w = torch.tensor([[-2.0, -0.7, -0.6, -0.01, 0.0, 0.6, 0.7, 3.0] + [0.0] * (G - 8)])
    got = fake_quantize_weight(w, a1, a2, G, c)[0, :8].tolist()
    assert got == [-1.0, -1.0, -0.25, -0.25, 0.25, 0.25, 1.0, 1.0]


@pytest.mark.parametrize("k", [64, 200], ids=["K=G", "padded"])
def test_sign_init_levels_are_symmetric_and_beat_a_naive_choice(k):
    w = _w(k=k)
    r = init_sign_scales(w, G)
    assert r.a1.shape == (16, -(-k // G)) and bool((r.s_lo <= r.s_hi).all()) and bool((r.s_lo >= 0).all())
    w_hat = fake_quantize_weight(w, r.a1, r.a2, G, r.c)
    for n in range(3):
        for g in range(r.a1.shape[1]):
            # c + a1 = -s_lo holds up to float32 rounding of the sum
            levels = torch.stack([r.s_hi[n, g], r.s_lo[n, g], -r.s_lo[n, g], -r.s_hi[n, g]])
            dist = (w_hat[n, g * G:(g + 1) * G, None] - levels).abs().amin(-1)
            assert float(dist.max()) <= 1e-7
    # naive: s_hi = max|w|, s_lo = s_hi / 3 (uniform grid over the range)
    hi = torch.nn.functional.pad(w.abs(), (0, r.a1.shape[1] * G - k)).reshape(16, -1, G).amax(-1)
    naive = fake_quantize_weight(w, hi - hi / 3, hi + hi / 3, G, -hi)
    assert (w - w_hat).square().mean() < (w - naive).square().mean()
    torch.testing.assert_close(r.mse.mean(), (torch.nn.functional.pad(w - w_hat, (0, r.a1.shape[1] * G - k))
                                              .reshape(16, -1, G).square().mean(-1)).mean())


def test_sign_init_zero_group():
    w = torch.zeros(2, G)
    r = init_sign_scales(w, G)
    assert torch.equal(fake_quantize_weight(w, r.a1, r.a2, G, r.c), w)
