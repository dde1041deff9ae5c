"""4-bit activation quantizer: reference bit-exactness, rounding/range, gradients, the two ops."""

import pytest
import torch

import dbllm_compile  # noqa: F401  (registers the ops)
from dbllm_compile.ops import ACT_QUANT_OP, ACT_QUANT_TRAIN_OP
from dbllm_compile.reference.activation import (
    clip_logit_from_ratio,
    clip_ratio_from_logit,
    dequantize_activation,
    fake_quantize_activation,
    quantize_activation_int,
)

SHAPES = [(1, 64), (7, 100), (2, 3, 64), (64,)]
SHAPE_IDS = ["M1", "oddM", "3d", "1d"]


def _rowwise_oracle(x, r):
    """Independent oracle: one token at a time, written out with Python scalars for the scale."""
    rows = x.float().reshape(-1, x.shape[-1])
    codes = torch.empty_like(rows, dtype=torch.int8)
    scales = torch.empty(rows.shape[0], 1)
    for i, row in enumerate(rows):
        s = torch.tensor(float(r)) * row.abs().max() / 7
        s = s if s > 0 else torch.tensor(1.0)
        codes[i] = torch.clamp(torch.round(row / s), -7, 7).to(torch.int8)
        scales[i] = s
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], 1)


def _assert_same_forward_and_grads(y, y_ref, inputs, ref_inputs):
    """Same output, and the same gradients of every input after backward of a random cotangent."""
    torch.testing.assert_close(y, y_ref)
    cotangent = torch.randn_like(y)
    y.backward(cotangent)
    y_ref.backward(cotangent)
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int_form_bit_exact_against_oracle_and_fake_quant(shape, dtype):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    r = torch.tensor(0.8)
    codes, scale = quantize_activation_int(x, r)
    ref_codes, ref_scale = _rowwise_oracle(x, r)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    fake = fake_quantize_activation(x, r)
    assert fake.dtype == dtype and fake.shape == x.shape
    assert torch.equal(fake, dequantize_activation(codes, scale, dtype))
    assert torch.equal(ACT_QUANT_OP(x, r), fake)
    assert torch.equal(ACT_QUANT_TRAIN_OP(x, torch.tensor(clip_logit_from_ratio(0.8))),
                       fake_quantize_activation(x, clip_ratio_from_logit(torch.tensor(clip_logit_from_ratio(0.8)))))


def test_rounding_is_half_to_even_and_range_symmetric():
    x = torch.tensor([[7.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -7.0]])
    codes, scale = quantize_activation_int(x, torch.tensor(1.0))
    assert scale.item() == 1.0
    assert codes.tolist() == [[7, 2, 4, -2, 0, 0, 2, -7]]
    # clipping: r = 0.5 -> s = 0.5, values beyond 3.5 saturate at +-7
    codes, _ = quantize_activation_int(x, torch.tensor(0.5))
    assert codes.tolist() == [[7, 5, 7, -5, -1, 1, 3, -7]]


def test_zero_token_and_infinite_logit():
    x = torch.zeros(2, 64)
    x[1, 3] = 1.0
    y = fake_quantize_activation(x, clip_ratio_from_logit(torch.tensor(float("inf"))))
    assert torch.isfinite(y).all() and torch.equal(y, x)  # r = 1: max-abs element exact


def _dense_ste(x, theta):
    """The same quantizer with plain autograd: clamp, then round with an STE; max detached."""
    r = torch.sigmoid(theta)
    m = x.abs().amax(-1, keepdim=True).detach()
    s = r * m / 7
    u = x / s
    c = torch.clamp(u, -7, 7)  # clamp first (as LSQ): 7 < |u| < 7.5 counts as clipped
    q = c + (torch.round(c) - c).detach()
    return q * s


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("ratio", [0.6, 0.95], ids=["r0.6", "r0.95"])
def test_gradients_match_dense_autograd(shape, ratio):
    # float32 like the reference (in float64 an element with |x/s| within rounding of 7 can
    # fall on the other side of the clip boundary)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    theta = torch.tensor(clip_logit_from_ratio(ratio))
    xa, ta = x.clone().requires_grad_(), theta.clone().requires_grad_()
    xb, tb = x.clone().requires_grad_(), theta.clone().requires_grad_()
    y = ACT_QUANT_TRAIN_OP(xa, ta)
    y_ref = _dense_ste(xb, tb)
    _assert_same_forward_and_grads(y, y_ref, (xa, ta), (xb, tb))
    assert ta.grad.shape == theta.shape


def test_clip_gradient_signs():
    """Clipped elements push r up (their error shrinks when r grows), as in PACT."""
    x = torch.tensor([[10.0, 0.1, 0.1, 0.1]])
    theta = torch.tensor(clip_logit_from_ratio(0.5), requires_grad=True)
    y = ACT_QUANT_TRAIN_OP(x, theta)
    ((y - x) ** 2).sum().backward()
    assert theta.grad < 0  # gradient descent increases theta, i.e. r


def test_deploy_op_gradient_is_straight_through_mask():
    x = torch.tensor([[4.0, 1.0, -3.0, 0.2]], requires_grad=True)
    y = ACT_QUANT_OP(x, torch.tensor(0.5))  # s = 2/7: |u| = 14, 3.5, 10.5, 0.7
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("shape", [(3, 5, 64), (1, 64)], ids=["3d", "M1"])
def test_opcheck_act_quant_train(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ACT_QUANT_TRAIN_OP, (x, theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_act_quant(dtype):
    x = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    torch.library.opcheck(ACT_QUANT_OP, (x, torch.tensor(0.9)))


def test_clip_must_have_one_element():
    with pytest.raises(Exception, match="one element"):
        ACT_QUANT_OP(torch.randn(2, 8), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        clip_logit_from_ratio(0.0)


# ---- per-group scales (group_size = G > 0: one scale per token and group of G features) ----


def _group_oracle(x, r, g):
    """Independent oracle: one token and one group at a time, Python loops over the groups."""
    rows = x.float().reshape(-1, x.shape[-1])
    k = rows.shape[1]
    codes = torch.empty_like(rows, dtype=torch.int8)
    scales = torch.empty(rows.shape[0], k // g)
    for i, row in enumerate(rows):
        for j in range(k // g):
            part = row[j * g:(j + 1) * g]
            s = torch.tensor(float(r)) * part.abs().max() / 7
            s = s if s > 0 else torch.tensor(1.0)
            codes[i, j * g:(j + 1) * g] = torch.clamp(torch.round(part / s), -7, 7).to(torch.int8)
            scales[i, j] = s
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], k // g)


GROUP_SHAPES = [(1, 64), (7, 96), (2, 3, 64), (64,)]


@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("g", [8, 32], ids=["G8", "G32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_codes_and_scales_bit_exact_against_oracle(shape, g, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen) * 2
    x[..., 5] *= 300  # a massive-activation channel: only its own group's scale grows
    x = x.to(dtype)
    r = torch.tensor(0.85)
    codes, scale = quantize_activation_int(x, r, g)
    ref_codes, ref_scale = _group_oracle(x, r, g)
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], shape[-1] // g)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    fake = fake_quantize_activation(x, r, g)
    assert fake.dtype == dtype and torch.equal(fake, dequantize_activation(codes, scale, dtype))
    expanded = scale.repeat_interleave(g, dim=-1)  # dequantize broadcasts each scale over its group
    assert torch.equal(fake, (codes.float() * expanded).to(dtype))
    assert torch.equal(ACT_QUANT_OP(x, r, g), fake)
    theta = torch.tensor(clip_logit_from_ratio(0.85))
    assert torch.equal(ACT_QUANT_TRAIN_OP(x, theta, g), fake_quantize_activation(x, clip_ratio_from_logit(theta), g))
    # the massive channel no longer flattens the other groups of its token
    per_token = quantize_activation_int(x, r)[0]
    assert (codes != 0).sum() > (per_token != 0).sum()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_group_size_k_equals_per_token_bit_exactly(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 5
    k = shape[-1]
    r = torch.tensor(0.7)
    codes0, scale0 = quantize_activation_int(x, r)
    codes_k, scale_k = quantize_activation_int(x, r, k)
    assert torch.equal(codes0, codes_k) and torch.equal(scale0, scale_k) and scale_k.shape[-1] == 1
    assert torch.equal(ACT_QUANT_OP(x, r), ACT_QUANT_OP(x, r, k))
    theta = torch.tensor(0.4)
    ga, gb = [torch.randn(shape, generator=torch.Generator().manual_seed(4))] * 2
    xa, ta = x.clone().requires_grad_(), theta.clone().requires_grad_()
    xb, tb = x.clone().requires_grad_(), theta.clone().requires_grad_()
    ACT_QUANT_TRAIN_OP(xa, ta).backward(ga)
    ACT_QUANT_TRAIN_OP(xb, tb, k).backward(gb)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ta.grad, tb.grad)


def test_zero_groups_get_scale_one_and_zero_codes():
    x = torch.zeros(2, 32)
    x[0, 3] = 2.0  # group 0 of token 0 non-zero; all other groups all-zero
    x[1, 20] = -1.0
    codes, scale = quantize_activation_int(x, torch.tensor(1.0), 8)
    expected = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]) / torch.full((2, 4), 7.0)
    assert torch.equal(scale, torch.where(expected > 0, expected, torch.ones_like(expected)))
    assert codes[0, 3] == 7 and codes[1, 20] == -7 and int(codes.abs().sum()) == 14
    y = fake_quantize_activation(x, torch.tensor(1.0), 8)
    assert torch.isfinite(y).all() and torch.equal(y, x)
    theta = torch.tensor(0.0, requires_grad=True)
    xg = x.clone().requires_grad_()
    ACT_QUANT_TRAIN_OP(xg, theta, 8).sum().backward()
    assert torch.isfinite(theta.grad) and torch.isfinite(xg.grad).all()


def test_k_not_divisible_by_group_is_a_clear_error():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError, match=r"G=64 does not divide the feature dimension K=100.*or 0"):
        quantize_activation_int(x, torch.tensor(0.9), 64)
    with pytest.raises(ValueError, match=r"K=100.*not divisible by group_size=64.*divides K, or 0"):
        ACT_QUANT_OP(x, torch.tensor(0.9), 64)
    with pytest.raises(ValueError, match=r"K=100.*not divisible by group_size=48"):
        ACT_QUANT_TRAIN_OP(x, torch.tensor(0.0), 48)
    with pytest.raises(ValueError, match=">= 0"):
        ACT_QUANT_OP(x, torch.tensor(0.9), -4)
    with pytest.raises(ValueError, match=">= 0"):
        fake_quantize_activation(x, torch.tensor(0.9), -4)


def _dense_ste_grouped(x, theta, g):
    """The grouped quantizer with plain autograd: per-group max detached, clamp, STE round."""
    r = torch.sigmoid(theta)
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    m = xg.abs().amax(-1, keepdim=True).detach()
    s = r * m / 7
    u = xg / s
    c = torch.clamp(u, -7, 7)
    q = c + (torch.round(c) - c).detach()
    return (q * s).reshape(x.shape)


@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (2, 3, 64), (64,)], ids=SHAPE_IDS)
@pytest.mark.parametrize("g", [16, 32], ids=["G16", "G32"])
@pytest.mark.parametrize("ratio", [0.6, 0.95], ids=["r0.6", "r0.95"])
def test_group_gradients_match_dense_autograd(shape, g, ratio):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    x[..., 1] *= 50  # one group with a large max: its elements get a different ds/dr = m_group / 7
    theta = torch.tensor(clip_logit_from_ratio(ratio))
    xa, ta = x.clone().requires_grad_(), theta.clone().requires_grad_()
    xb, tb = x.clone().requires_grad_(), theta.clone().requires_grad_()
    y = ACT_QUANT_TRAIN_OP(xa, ta, g)
    y_ref = _dense_ste_grouped(xb, tb, g)
    _assert_same_forward_and_grads(y, y_ref, (xa, ta), (xb, tb))


def test_group_clip_gradient_explicit_formula():
    """dL/dtheta = sum_e dL/dy_e * d_s(e) * m_group(e) / 7 * r (1 - r), written out per group."""
    x = torch.tensor([[10.0, 0.1, 0.2, -0.3, 1.0, -2.0, 0.5, 0.25]])
    r = 0.5
    theta = torch.tensor(clip_logit_from_ratio(r), requires_grad=True)
    gy = torch.tensor([[1.0, -2.0, 0.5, 3.0, 1.5, -1.0, 2.0, 0.75]])
    ACT_QUANT_TRAIN_OP(x, theta, 4).backward(gy)
    expected = 0.0
    for j in range(2):
        part = x[0, 4 * j:4 * j + 4]
        m = float(part.abs().max())
        s = torch.tensor(r) * m / 7
        for e, v in enumerate(part):
            u = float(v / s)
            ds = (round(u) - u) if abs(u) <= 7 else max(-7, min(7, round(u)))
            expected += float(gy[0, 4 * j + e]) * ds * m / 7
    expected *= r * (1 - r)
    assert float(theta.grad) == pytest.approx(expected, rel=1e-5)


def test_group_deploy_gradient_is_the_per_group_mask():
    x = torch.tensor([[4.0, 1.0, 0.1, 0.01]], requires_grad=True)
    y = ACT_QUANT_OP(x, torch.tensor(0.5), 2)  # s = (2/7, 0.05/7): |u| = 14, 3.5 | 14, 1.4
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("g", [16, 64], ids=["G16", "G64"])
def test_opcheck_group_ops(g):
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ACT_QUANT_TRAIN_OP, (x, theta, g))
    torch.library.opcheck(ACT_QUANT_OP, (torch.randn(4, 64, requires_grad=True), torch.tensor(0.9), g))
