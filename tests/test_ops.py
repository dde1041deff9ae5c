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


# ------------------------------------------------------------------ the offset c (sign codebook)

def _sign_layer(n=6, k=70, dtype=torch.float64, seed=0):
    """Levels c + {0, a2, a1, a1+a2} at least 0.5 apart and latent weights within 0.05 of a level,
    so a perturbation of 1e-3 in any scale or offset never moves a bit (finite differences see
    the same bits as the analytic gradient)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // G)
    a1 = (1.0 + torch.rand(n, groups, generator=g)).to(dtype)       # [1, 2]
    a2 = (-2.6 - torch.rand(n, groups, generator=g)).to(dtype)      # [-3.6, -2.6]: gaps >= 0.6
    c = torch.randn(n, groups, generator=g).to(dtype)
    b1 = torch.randint(0, 2, (n, groups * G), generator=g)
    b2 = torch.randint(0, 2, (n, groups * G), generator=g)
    w = dequantize_bits(b1, b2, a1, a2, G, c)[:, :k].to(dtype)
    w = w + (torch.rand(w.shape, generator=g).to(dtype) - 0.5) * 0.1
    bias = torch.randn(n, generator=g).to(dtype)
    return w, a1, a2, c, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_ops_with_offset(with_bias):
    w, a1, a2, c, b = _sign_layer()
    x = torch.randn(3, 5, 70, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.dbllm.db_linear_train.default,
                          (x, w.clone().requires_grad_(), a1.clone().requires_grad_(), a2.clone().requires_grad_(),
                           b.clone().requires_grad_() if with_bias else None, G, torch.float16, c.clone().requires_grad_()))
    s1, s2, sc = a1.half(), a2.half(), c.half()
    packed = pack_planes(*assign_bits(w, s1.float(), s2.float(), G, sc.float()))
    torch.library.opcheck(torch.ops.dbllm.db_linear.default,
                          (x.detach().float(), packed, s1, s2, b.float() if with_bias else None, 70, G, sc))


def test_gradcheck_scales_offset_bias_and_input():
    """float64 gradcheck of the training op in x, a1, a2, bias and c (the latent weight is
    straight-through, not differentiable, so it is held fixed). The reference dequantizes in
    float32 (dual_binary's documented arithmetic), so eps = 1e-3 keeps the float32 rounding of
    y (~1e-7 relative) far below the finite-difference signal; tolerance 1e-3 covers it."""
    w, a1, a2, c, b = _sign_layer()
    x = torch.randn(3, 70, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a1, a2, b, c))

    def f(x, a1, a2, b, c):
        return torch.ops.dbllm.db_linear_train(x, w, a1, a2, b, G, torch.float64, c)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=1e-3, rtol=1e-3)


def test_gradient_of_offset_is_the_group_sum_over_real_features():
    w, a1, a2, c, _ = _sign_layer(k=70, dtype=torch.float32)
    c = c.clone().requires_grad_()
    x = torch.randn(4, 70)
    grad_y = torch.randn(4, 6)
    torch.ops.dbllm.db_linear_train(x, w, a1, a2, None, G, torch.float32, c).backward(grad_y)
    grad_w_hat = grad_y.T @ x  # [N, K]
    expected = torch.stack([grad_w_hat[:, g * G:(g + 1) * G].sum(-1) for g in range(c.shape[1])], -1)
    torch.testing.assert_close(c.grad, expected, rtol=1e-5, atol=1e-5)


def test_offset_gradients_match_dense_autograd_and_the_decomposed_op():
    from dbllm_compile.backends.dynamo.train_decomposition import db_linear_train_decomposed

    w, a1, a2, c, b = _sign_layer(dtype=torch.float32, seed=2)
    x = torch.randn(2, 3, 70)
    leaves = [t.clone().requires_grad_() for t in (x, w, a1, a2, b, c)]
    ref = [t.clone().requires_grad_() for t in (x, w, a1, a2, b, c)]
    out = torch.ops.dbllm.db_linear_train(*leaves[:5], G, torch.float16, leaves[5])
    out_ref = db_linear_train_decomposed(*ref[:5], G, torch.float16, ref[5])
    assert torch.equal(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for name, got, exp in zip(("x", "weight", "a1", "a2", "bias", "c"), leaves, ref):
        torch.testing.assert_close(got.grad, exp.grad, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [G, 70], ids=["k=G", "k=70-padded"])
def test_train_deploy_and_decomposed_forms_are_identical_with_offset(dtype, k):
    from dbllm_compile.passes.decompose import db_linear_decomposed

    w, a1, a2, c, b = _sign_layer(k=k, dtype=torch.float32, seed=3)
    w, b = w.to(dtype), b.to(dtype)
    x = torch.randn(3, 7, k).to(dtype)
    y_train = torch.ops.dbllm.db_linear_train(x, w, a1, a2, b, G, torch.float16, c)
    s1, s2, sc = a1.half(), a2.half(), c.half()
    packed = pack_planes(*assign_bits(w, s1.float(), s2.float(), G, sc.float()))
    y_deploy = torch.ops.dbllm.db_linear(x, packed, s1, s2, b, k, G, sc)
    assert y_train.dtype == dtype
    assert torch.equal(y_train, y_deploy)
    assert torch.equal(db_linear_decomposed(x, packed, s1, s2, b, k, G, sc), y_deploy)
    # the offset is really there: without it the output differs
    assert not torch.equal(torch.ops.dbllm.db_linear(x, packed, s1, s2, b, k, G), y_deploy)


def test_offset_shape_mismatch_is_a_clear_error():
    w, a1, a2, c, b = _sign_layer(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"db_linear_train: offset c shape \(6, 2\) != \(6, 3\)"):
        torch.ops.dbllm.db_linear_train(torch.randn(2, 70), w, a1, a2, b, G, torch.float16, c[:, :2])
    packed = pack_planes(*assign_bits(w, a1, a2, G, c))
    with pytest.raises(RuntimeError, match=r"db_linear: offset c shape \(5, 3\) != \(6, 3\)"):
        torch.ops.dbllm.db_linear(torch.randn(2, 70), packed, a1, a2, b, 70, G, c[:5])
