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
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ta.grad, tb.grad)
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
