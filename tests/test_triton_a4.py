"""4-bit-activation kernels (backends/triton/a4.py) against their references.

Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported) on tiny shapes; with a GPU on CUDA. Codes and scales of the activation quantizer are
bit-exact; the int8 GEMM is compared with the float64 evaluation of the same formula
(``rtol`` 2 ulp of fp16 on ``max|y|``: the integer products are exact, only float32 scaling and
the final rounding differ) and, looser, with the module-level numerics (fake-quantized
activations rounded to fp16, then the dual-binary linear).
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, make_layer as make_packed_layer

from dbllm_compile.backends.triton import a4  # noqa: E402
from dbllm_compile.backends.triton.layout import to_gpu_layout  # noqa: E402
from dbllm_compile.reference.activation import fake_quantize_activation, quantize_activation_int  # noqa: E402
from dbllm_compile.reference.linear import db_linear_packed_reference  # noqa: E402


def make_layer(n, k, g, seed=0):
    """A random layer in the GPU layout, plus its reference-layout planes and scales (on CPU)."""
    packed, a1, a2, bias, _ = make_packed_layer(n, k, g, seed=seed)
    gw = to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    return gw, packed.cpu(), a1.cpu(), a2.cpu(), bias


@pytest.mark.parametrize("ratio", [0.95, 1.0, 0.3])
def test_act_quant_kernel_is_bit_exact(ratio):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 200, generator=gen) * 3
    x[1] = 0.0                                           # a zero row: scale 1, codes 0
    x[2, :8] = torch.tensor([7.0, -3.5, 2.5, 0.5, -0.5, 1.5, -2.5, 6.5])  # ties, r = 1 -> s = 1
    x[2, 8:] = 0.0
    x = x.half().to(DEVICE)
    r = torch.tensor(ratio)
    q, s = a4.act_quant_int8(x, r, k_alloc=256, block_k=64)
    q_ref, s_ref = quantize_activation_int(x.cpu(), r)
    assert torch.equal(q[:, :200].cpu(), q_ref) and torch.equal(q[:, 200:].cpu(), torch.zeros(6, 56, dtype=torch.int8))
    assert torch.equal(s.cpu(), s_ref.flatten())


@pytest.mark.parametrize("m,n,k,g", [(1, 48, 128, 32), (5, 40, 100, 32), (17, 64, 192, 64), (3, 32, 256, 128)],
                         ids=["m1", "pad-k-odd-n", "g64", "g128"])
@pytest.mark.parametrize("int_levels", [False, True], ids=["exact", "int-levels"])
def test_a4_matmul_matches_integer_reference(m, n, k, g, int_levels):
    gw, packed, a1, a2, bias = make_layer(n, k, g, seed=m + n)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 2).half().to(DEVICE)
    r = torch.tensor(0.9)
    y = a4.a4_linear(x, r, gw, bias, int_levels=int_levels, block_m=16, block_n=32)
    q, s = a4.act_quant_int8(x, r, gw.qweight.shape[1] * 16)
    ref = a4.a4_linear_reference(q.cpu(), s.cpu(), _cpu(gw), bias.cpu(), int_levels_mode=int_levels)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    if not int_levels:  # the module-level numerics: fake-quantized fp16 activations, then the linear
        xq = fake_quantize_activation(x.cpu(), r)
        ref2 = db_linear_packed_reference(xq.float(), packed, a1, a2, bias.cpu().float(), k, g)
        torch.testing.assert_close(y.cpu().float(), ref2, rtol=4e-3, atol=4e-3 * ref2.abs().max().item())


def _cpu(gw):
    from dbllm_compile.backends.triton.layout import GpuWeights

    return GpuWeights(gw.qweight.cpu(), gw.scales.cpu(), gw.in_features, gw.group_size)


def test_int_levels_error_is_far_below_the_two_bit_error():
    gw, *_ = make_layer(64, 256, 64, seed=5)
    err = a4.int_level_error(_cpu(gw))
    assert err["rel_level_error"] < 1 / 127, err   # at most t/2 per level, t = max level / 127


def test_a4_rejects_unsupported_group_and_shape():
    gw, *_ = make_layer(32, 64, 32, seed=0)
    with pytest.raises(ValueError, match="features"):
        a4.a4_linear(torch.zeros(1, 65, dtype=torch.float16, device=DEVICE), torch.tensor(1.0), gw)
    assert not a4.a4_supported(16) and a4.a4_supported(64)


@pytest.mark.parametrize("k,with_c", [(128, False), (100, True)], ids=["k=4g", "pad-k-offset"])
def test_cuda_implementations_of_the_int_ops(k, with_c):
    """``int_dispatch`` (the CUDA kernels of ``act_quant_int`` / ``db_linear_a4``) against the
    reference ops: codes bit-exact, outputs within fp16 rounding (interpreter without a GPU)."""
    from dbllm_compile import ops_int  # noqa: F401
    from dbllm_compile.backends.triton.dispatch import clear_cache
    from dbllm_compile.backends.triton.int_dispatch import act_quant_int_cuda, db_linear_a4_cuda

    n, g = 40, 32
    packed, a1, a2, bias, _ = make_packed_layer(n, k, g, seed=7)
    c = (torch.randn(n, a1.shape[1], generator=torch.Generator().manual_seed(8)) * 0.01).half().to(DEVICE) if with_c else None
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    r = torch.tensor(0.85, device=DEVICE)
    codes, scale = act_quant_int_cuda(x, r)
    ref_codes, ref_scale = quantize_activation_int(x.cpu(), r.cpu())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)
    y = db_linear_a4_cuda(codes, scale, packed, a1, a2, bias, k, g, torch.float16, c)
    ref = torch.ops.dbllm.db_linear_a4(codes.cpu(), scale.cpu(), packed.cpu(), a1.cpu(), a2.cpu(), bias.cpu().float(),
                                       k, g, torch.float32, None if c is None else c.cpu())
    assert y.shape == (2, 3, n) and y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().float(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())
    clear_cache()
