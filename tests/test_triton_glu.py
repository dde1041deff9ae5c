"""The gated-MLP form of the batch-1 gemv (``db_gemv_kernel`` with ``GLU``) and ``dbllm::db_glu_gpu``.

Weight rows ``[gate; up]`` (2H rows), result ``silu(x @ gate.T + b_g) * (x @ up.T + b_u)`` of H
features, against the float32 reference of the two products. Without a GPU under Triton's
interpreter; on a GPU with the inline-PTX path and the real shapes of Llama-2-7B and SmolLM2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_setup import DEVICE, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: F401
import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends import triton as dbt
from dbllm_compile.backends.triton import launch, tuning
from dbllm_compile.backends.triton.launch import KernelConfig

if GPU:
    SHAPES = [(11008, 4096, 64), (1536, 576, 64), (1000, 4100, 64), (300, 1000, 32), (14336, 4096, 128)]
    CONFIGS = None  # the tuner's gemv candidates, without split-K
else:
    SHAPES = [(20, 128, 64), (35, 256, 64), (9, 100, 32), (3, 1100, 64)]
    CONFIGS = [KernelConfig(kind="gemv", block_n=16, block_k=128, num_warps=2, num_stages=1),
               KernelConfig(kind="gemv", block_n=2, block_k=64, num_warps=1, num_stages=1),
               KernelConfig(kind="gemv", block_n=8, block_k=256, num_warps=4, num_stages=1)]
IDS = [f"h{h}-k{k}-g{g}" for h, k, g in SHAPES]


def _configs(n, k, g):
    if CONFIGS is not None:
        return [c for c in CONFIGS if launch.config_fits(c, g)]
    return [c for c in tuning.candidates(1, n, k, g, dtype=torch.float16) if c.kind == "gemv" and c.split_k == 1]


def _glu_reference(x, packed, a1, a2, bias, k, g):
    y = reference(x, packed, a1, a2, bias, k, g)
    h = y.shape[-1] // 2
    return F.silu(y[..., :h]) * y[..., h:]


@pytest.mark.parametrize("h,k,g", SHAPES, ids=IDS)
def test_glu_gemv_matches_reference(h, k, g):
    """Every configuration, with and without bias: H not a multiple of BLOCK_N / 2 (the last
    program's slots past H are clamped and not stored), K not a multiple of the tile or of G."""
    packed, a1, a2, bias, _ = make_layer(2 * h, k, g, seed=h + k)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half().to(DEVICE)
    refs = {True: _glu_reference(x, packed, a1, a2, bias, k, g), False: _glu_reference(x, packed, a1, a2, None, k, g)}
    cfgs = _configs(2 * h, k, g)
    assert cfgs
    for i, cfg in enumerate(cfgs):
        with_bias = i % 2 == 0
        assert launch.glu_gemv_applies(x, gw, cfg)
        z = launch.launch_gemv(x, gw, bias if with_bias else None, cfg, glu=True)
        assert z.shape == (1, h) and z.dtype == torch.float16
        assert_close(z, refs[with_bias], torch.float16)


def test_glu_gemv_refuses_what_it_cannot_run():
    h, k, g = 6, 128, 64
    packed, a1, a2, bias, _ = make_layer(2 * h, k, g, seed=1)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    ok = KernelConfig(kind="gemv", block_n=4, block_k=64, num_warps=1, num_stages=1)
    refused = [KernelConfig(kind="gemv", block_n=4, block_k=64, num_warps=1, num_stages=1, split_k=2),
               KernelConfig(kind="gemv", block_n=1, block_k=64, num_warps=1, num_stages=1),
               KernelConfig(block_m=16, block_n=16, block_k=64)]
    assert launch.glu_gemv_applies(x, gw, ok)
    for cfg in refused:
        assert not launch.glu_gemv_applies(x, gw, cfg)
        with pytest.raises(ValueError, match="GLU gemv needs" if cfg.kind == "gemv" else "runs gemv configs"):
            launch.launch_gemv(x, gw, None, cfg, glu=True)
    odd = dbt.to_gpu_layout(*make_layer(2 * h + 1, k, g, seed=2)[:3], k, g, torch.float16)
    assert not launch.glu_gemv_applies(x, odd, ok)
    with pytest.raises(ValueError, match="even number of weight rows"):
        launch.launch_gemv(x, odd, None, ok, glu=True)


@pytest.mark.parametrize("m", [1, 3])
def test_glu_op_matches_reference_and_keeps_leading_dims(m):
    """``dbllm::db_glu_gpu`` end to end: batch 1 takes the GLU gemv on a GPU, other batches (and
    the CPU) the linear plus torch's ``silu * up``."""
    h, k, g = 24, 256, 64
    packed, a1, a2, bias, _ = make_layer(2 * h, k, g, seed=7)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(m, 1, k, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    z = torch.ops.dbllm.db_glu_gpu(x, gw.qweight, gw.scales, bias, k, g)
    assert z.shape == (m, 1, h) and z.dtype == torch.float16
    ref = _glu_reference(x.reshape(m, k), packed, a1, a2, bias, k, g)
    assert_close(z.reshape(m, h), ref, torch.float16)


def test_glu_op_gradients_match_autograd_of_the_reference():
    h, k, g = 8, 128, 64
    packed, a1, a2, bias, _ = make_layer(2 * h, k, g, seed=9)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)  # x in float32: the torch path
    w = dbt.dequantize_gpu_layout(gw).float()
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(4), dtype=torch.float32).to(DEVICE)
    b = bias.float().clone()
    grads = []
    for use_op in (True, False):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        if use_op:
            z = torch.ops.dbllm.db_glu_gpu(xi, gw.qweight, gw.scales, bi, k, g)
        else:
            y = F.linear(xi, w.to(xi.device), bi)
            z = F.silu(y[:, :h]) * y[:, h:]
        (z * torch.arange(h, device=z.device)).sum().backward()
        grads.append((xi.grad, bi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)
