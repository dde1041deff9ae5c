"""The torch.library ops: opcheck, gradients against a dense autograd reference, train == deploy."""

import pytest
import torch

import dbllm_compile  # noqa: F401  (registers the ops)
from dbllm_compile.reference import assign_bits, dequantize_bits, init_scales, pack_planes

G = 32


def _layer(n=24, k=100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    r = init_scales(w.float(), G)
    bias = torch.randn(n, generator=g).to(dtype)
    return w, r.a1, r.a2, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["s16", "s32"])
def test_opcheck_train_op(with_bias, scale_dtype):
    w, a1, a2, b = _layer(dtype=torch.float64)
    x = torch.randn(3, 5, 100, dtype=torch.float64, requires_grad=True)
    args = (x, w.requires_grad_(), a1.double().requires_grad_(), a2.double().requires_grad_(),
            b.requires_grad_() if with_bias else None, G, scale_dtype)
    torch.library.opcheck(torch.ops.dbllm.db_linear_train.default, args)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_deploy_op(with_bias):
    w, a1, a2, b = _layer()
    packed = pack_planes(*assign_bits(w, a1.half().float(), a2.half().float(), G))
    x = torch.randn(4, 100)
    torch.library.opcheck(torch.ops.dbllm.db_linear.default,
                          (x, packed, a1.half(), a2.half(), b if with_bias else None, 100, G))


def _dense_reference(x, w, a1, a2, bias, scale_dtype):
    """Same function with plain autograd: bits detached, STE for the latent weight."""
    s1 = a1 + (a1.to(scale_dtype).to(a1.dtype) - a1).detach()
    s2 = a2 + (a2.to(scale_dtype).to(a2.dtype) - a2).detach()
    b1, b2 = assign_bits(w.detach(), s1.detach(), s2.detach(), G)
    n, k = w.shape
    g1 = b1.reshape(n, -1, G).to(w.dtype)
    g2 = b2.reshape(n, -1, G).to(w.dtype)
    w_hat = (s1.unsqueeze(-1) * g1 + s2.unsqueeze(-1) * g2).reshape(n, -1)[:, :k]
    w_ste = w_hat + (w - w.detach())
    return torch.nn.functional.linear(x, w_ste, bias)


@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 100), (100,)], ids=["2d", "3d", "1d"])
def test_gradients_match_dense_autograd_reference(shape):
    w, a1, a2, b = _layer(dtype=torch.float64, seed=1)
    a1, a2 = a1.double(), a2.double()
    x = torch.randn(*shape, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, a1, a2, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, a1, a2, b)]
    out = torch.ops.dbllm.db_linear_train(*leaves, G, torch.float16)
    out_ref = _dense_reference(*ref, torch.float16)
    torch.testing.assert_close(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for name, got, exp in zip(("x", "weight", "a1", "a2", "bias"), leaves, ref):
        torch.testing.assert_close(got.grad, exp.grad, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_gradient_of_scales_is_sum_of_grad_times_bits():
    w, a1, a2, _ = _layer(n=4, k=G)
    a1 = a1.clone().requires_grad_()
    x = torch.randn(6, G)
    y = torch.ops.dbllm.db_linear_train(x, w, a1, a2, None, G, torch.float32)
    y.sum().backward()
    b1, _ = assign_bits(w, a1.detach(), a2, G)
    expected = (torch.ones(6, 4).T @ x * b1.float()).sum(-1, keepdim=True)
    torch.testing.assert_close(a1.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [G, 100], ids=["k=G", "k=100-padded"])
def test_train_and_deploy_forms_are_identical(dtype, k):
    w, a1, a2, b = _layer(k=k, dtype=dtype, seed=2)
    x = torch.randn(3, 7, k).to(dtype)
    y_train = torch.ops.dbllm.db_linear_train(x, w, a1, a2, b, G, torch.float16)
    s1, s2 = a1.half(), a2.half()
    packed = pack_planes(*assign_bits(w, s1.float(), s2.float(), G))
    y_deploy = torch.ops.dbllm.db_linear(x, packed, s1, s2, b, k, G)
    assert y_train.dtype == dtype
    assert torch.equal(y_train, y_deploy)


def test_deploy_matches_explicit_dequantized_matmul():
    w, a1, a2, b = _layer(seed=3)
    b1, b2 = assign_bits(w, a1, a2, G)
    w_hat = dequantize_bits(b1, b2, a1, a2, G)[:, :100]
    x = torch.randn(5, 100)
    y = torch.ops.dbllm.db_linear(x, pack_planes(b1, b2), a1, a2, b, 100, G)
    torch.testing.assert_close(y, x @ w_hat.T + b)


def test_shape_mismatch_is_a_clear_error():
    w, a1, a2, b = _layer()
    with pytest.raises(RuntimeError, match="x has 99 features, weight expects 100"):
        torch.ops.dbllm.db_linear_train(torch.randn(2, 99), w, a1, a2, b, G, torch.float16)
    with pytest.raises(RuntimeError, match="a1 shape"):
        torch.ops.dbllm.db_linear_train(torch.randn(2, 100), w, a1[:, :1], a2, b, G, torch.float16)
