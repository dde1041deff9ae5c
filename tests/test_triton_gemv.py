"""The batch-1 gemv kernel (``backends/triton/gemv.py``) against the reference.

Without a GPU it runs in Triton's interpreter (integer-op table lookup, float32 sums); on a GPU
the inline-PTX path (fp16 pair sums per code word). Same tolerance as the other kernels
(``triton_setup.assert_close``: 2 ulp of fp16, ``atol = rtol * max|y|``).
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: F401
import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends import triton as dbt
from dbllm_compile.backends.triton import launch, tuning
from dbllm_compile.backends.triton.launch import KernelConfig

GEMV = KernelConfig(kind="gemv", block_n=16, block_k=128, num_warps=2, num_stages=1)

if GPU:
    SHAPES = [(4096, 4096, 64), (11008, 4096, 64), (4000, 4160, 64), (1000, 4100, 64), (300, 1000, 32),
              (4096, 1024, 128), (576, 576, 64), (28672, 8192, 64)]
    CONFIGS = None  # the tuner's gemv candidates
else:
    SHAPES = [(40, 128, 64), (70, 256, 64), (33, 64, 64), (20, 192, 32), (9, 100, 32), (5, 1100, 64)]
    CONFIGS = [GEMV, KernelConfig(kind="gemv", block_n=32, block_k=256, num_warps=4, num_stages=1),
               KernelConfig(kind="gemv", block_n=16, block_k=64, num_warps=1, num_stages=1, split_k=2),
               KernelConfig(kind="gemv", block_n=16, block_k=64, num_warps=1, num_stages=1, split_k=3)]
IDS = [f"n{n}-k{k}-g{g}" for n, k, g in SHAPES]


def _configs(n, k, g):
    if CONFIGS is not None:
        return [c for c in CONFIGS if launch.config_fits(c, g)]
    return [c for c in tuning.candidates(1, n, k, g, dtype=torch.float16) if c.kind == "gemv"]


@pytest.mark.parametrize("n,k,g", SHAPES, ids=IDS)
def test_gemv_matches_reference(n, k, g):
    """Every gemv configuration, with and without bias: N not a multiple of BLOCK_N, K not a multiple
    of BLOCK_K or of G (masked pairs of x), K = G, split-K with splits of one tile."""
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=n + k)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half().to(DEVICE)
    ref = reference(x, packed, a1, a2, bias, k, g)
    ref_nb = reference(x, packed, a1, a2, None, k, g)
    cfgs = _configs(n, k, g)
    assert cfgs
    for i, cfg in enumerate(cfgs):
        with_bias = i % 2 == 0
        y = launch.run_config(x, gw, bias if with_bias else None, cfg)
        assert y.shape == (1, n) and y.dtype == torch.float16
        assert_close(y, ref if with_bias else ref_nb, torch.float16)


def test_gemv_rows_of_x_are_a_grid_axis_and_strided_rows_work():
    n, k, g = 24, 256, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=3)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    big = torch.randn(3, k + 10, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    x = big[:, :k]  # row stride k + 10 (even: pairs stay aligned)
    y = launch.run_config(x, gw, bias, GEMV)
    assert_close(y, reference(x, packed, a1, a2, bias, k, g), torch.float16)
    one = big[1:2, :k]
    assert_close(launch.run_config(one, gw, None, GEMV), reference(one, packed, a1, a2, None, k, g), torch.float16)


def test_gemv_falls_back_to_the_fused_kernel_where_it_cannot_read_x():
    """Odd K, rows not 4-byte aligned and bf16 run the fused default instead of failing."""
    g = 32
    for k, offset in ((95, 0), (96, 1)):
        packed, a1, a2, bias, _ = make_layer(10, k, g, seed=k)
        gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
        buf = torch.randn(1, k + offset, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
        x = buf[:, offset:]
        assert not launch.gemv_applies(x)
        assert_close(launch.run_config(x, gw, bias, GEMV), reference(x, packed, a1, a2, bias, k, g), torch.float16)


def test_gemv_split_k_is_deterministic_and_writes_a_row_stride_output():
    n, k, g = 20, 512, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=5)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    cfg = KernelConfig(kind="gemv", block_n=16, block_k=64, num_warps=1, num_stages=1, split_k=3)
    a = launch.run_config(x, gw, bias, cfg)
    assert torch.equal(a, launch.run_config(x, gw, bias, cfg))
    wide = torch.zeros(1, n + 6, dtype=torch.float16, device=DEVICE)
    launch.launch_gemv(x, gw, bias, cfg, out=wide[:, 3:3 + n])
    assert torch.equal(wide[:, 3:3 + n], a) and not wide[:, :3].any() and not wide[:, 3 + n:].any()


def test_gemv_names_parse_and_are_tuned_only_at_batch_1_fp16():
    cfg = KernelConfig(kind="gemv", block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=2)
    assert cfg.short() == "gemv64x256w4s3sk2" and KernelConfig.parse(cfg.short()) == cfg
    assert KernelConfig.parse("gemv128x512w8s3") == KernelConfig(kind="gemv", block_n=128, block_k=512,
                                                                 num_warps=8, num_stages=3)
    assert tuning.m_bucket(1) == 1 and tuning.m_bucket(2) == 16
    assert tuning.cache_key(torch.float16, 8, 8, 64, 1) != tuning.cache_key(torch.float16, 8, 8, 64, 2)
    kinds = lambda m, dt: {c.kind for c in tuning.candidates(m, 4096, 4096, 64, sms=132, dtype=dt)}  # noqa: E731
    assert "gemv" in kinds(1, torch.float16)
    assert "gemv" not in kinds(2, torch.float16) and "gemv" not in kinds(1, torch.bfloat16)
    with pytest.raises(ValueError, match="launch_gemv runs gemv configs"):
        packed, a1, a2, _, _ = make_layer(4, 64, 64)
        launch.launch_gemv(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE),
                           dbt.to_gpu_layout(packed, a1, a2, 64, 64, torch.float16), None, KernelConfig())
