"""The sign codebook (LBLLM): a1*b1 + a2*b2 + c, symmetric levels, MSE init."""

import pytest
import torch

from dbllm_compile.reference import assign_bits, dequantize_bits, init_scales, pack_planes
from dbllm_compile.reference.linear import add_offset_term, db_linear_packed_reference, offset_term_reference
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


def test_sign_init_refinement_never_raises_the_error_and_frees_the_offset():
    w = _w(k=200, seed=3)
    errs = [float(init_sign_scales(w, G, refine_iters=i).mse.mean()) for i in (0, 1, 3)]
    assert errs[0] >= errs[1] >= errs[2] and errs[2] < errs[0]
    r = init_sign_scales(w, G, refine_iters=2)
    assert not bool(((r.a1 + r.a2 + 2 * r.c).abs() < 1e-6).all())  # three free parameters now


def test_sign_maxabs_init_is_the_uniform_grid_over_the_range():
    w = _w(k=G)
    r = init_sign_scales(w, G, method="maxabs")
    top = w.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(r.s_hi, top)
    torch.testing.assert_close(r.s_lo, top / 3)
    assert float(r.mse.mean()) > float(init_sign_scales(w, G).mse.mean())
    with pytest.raises(ValueError, match="unknown init method 'nope'"):
        init_sign_scales(w, G, method="nope")


# ------------------------------------------------------------------ the offset term outside a kernel

def _sign_layer(n=12, k=200, seed=0):
    w = _w(n=n, k=k, seed=seed)
    r = init_sign_scales(w, G)
    packed = pack_planes(*assign_bits(w, r.a1.half().float(), r.a2.half().float(), G, r.c.half().float()))
    return packed, r.a1.half(), r.a2.half(), r.c.half()


@pytest.mark.parametrize("k", [G, 200], ids=["K=G", "K=200-padded"])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3)], ids=["M=1", "M=5", "3d"])
def test_offset_term_decomposition_matches_the_reference(k, shape):
    """y(c) = y(no c) + (x group sums) @ c.T: what the CUDA dispatcher adds outside the kernel.
    Equal up to float32 summation order (one extra rounding of y), hence the tolerances."""
    packed, a1, a2, c = _sign_layer(k=k)
    x = torch.randn(*shape, k)
    ref = db_linear_packed_reference(x, packed, a1, a2, None, k, G, c)
    split = add_offset_term(db_linear_packed_reference(x, packed, a1, a2, None, k, G), x, c, k, G)
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)
    # padded features count nothing: changing what would sit in the padding changes nothing
    off = offset_term_reference(x, c, k, G)
    expected = torch.stack([x[..., g * G:(g + 1) * G].sum(-1) for g in range(c.shape[1])], -1) @ c.float().T
    torch.testing.assert_close(off, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dispatch_adds_the_offset_around_a_kernel(dtype):
    pytest.importorskip("triton")
    from dbllm_compile.backends.triton.dispatch import kernel_with_offset

    k = 200
    packed, a1, a2, c = _sign_layer(k=k, seed=4)
    x = torch.randn(7, k).to(dtype)
    bias = torch.randn(12).to(dtype)
    # the reference without c stands in for the Triton kernel (same contract: a1*b1 + a2*b2 + bias)
    got = kernel_with_offset(lambda: db_linear_packed_reference(x, packed, a1, a2, bias, k, G), x, c, k, G)
    exact = db_linear_packed_reference(x.double(), packed, a1.double(), a2.double(), bias.double(), k, G, c.double())
    assert got.dtype == dtype
    # two roundings to the 16-bit dtype (kernel output, then the sum) against one: 2 ulps of |y|
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), exact, rtol=4 * eps, atol=4 * eps * float(exact.abs().max()))
    y0 = torch.zeros(7, 12, dtype=dtype)
    assert kernel_with_offset(lambda: y0, x, None, k, G) is y0  # c=None: the kernel's output untouched


def test_sign_grid_search_by_prefix_sums_equals_the_direct_search():
    """The prefix-sum search picks the same (s_hi, s_lo) as evaluating every candidate on every
    weight (the definition), here checked group by group on a small grid."""
    from dbllm_compile.reference.sign_codebook import SIGN_RATIOS, _sign_grid_search

    w = _w(n=6, k=128, seed=5)
    w[0, :7] = 0.2  # repeated outliers: ties between candidates
    mag = w.abs().reshape(6, 2, G)
    top = mag.amax(-1, keepdim=True)
    hi, lo = _sign_grid_search(mag, top, 12)
    best = torch.full_like(top, float("inf"))
    exp_hi, exp_lo = torch.zeros_like(top), torch.zeros_like(top)
    for t in torch.linspace(1.0 / 12, 1.0, 12).tolist():
        for rho in SIGN_RATIOS:
            h = top * t
            lw = h * torch.tensor(rho)
            err = (mag - torch.where(mag < (lw + h) * 0.5, lw, h)).double().square().sum(-1, keepdim=True)
            better = err < best
            best, exp_hi, exp_lo = torch.where(better, err, best), torch.where(better, h, exp_hi), torch.where(better, lw, exp_lo)
    assert torch.equal(hi, exp_hi) and torch.equal(lo, exp_lo)
