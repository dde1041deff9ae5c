"""The small-batch mma kernel (``backends/triton/mma16.py``, config kind ``mma``) against the reference.

Without a GPU: Triton's interpreter, whose path computes every accumulator element from whole
code words (rows, tokens, chunks, splits, bias and stores; not the ``mma.sync`` fragment
layout). On a GPU: the inline-PTX path on the issue's shapes and odd ones (N not a multiple of
the block, K = one chunk, G = 32/64/128), M from 1 to 16, split-K, bias, both lane-word orders
(``strided``), a row-stride
output, and inputs the kernel cannot read (the fused kernel runs then). Same tolerance as the
other kernels (``triton_setup.assert_close``).
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: F401
import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends import triton as dbt
from dbllm_compile.backends.triton import launch
from dbllm_compile.backends.triton.launch import KernelConfig
from dbllm_compile.backends.triton.mma16 import launch_mma16, mma_applies

C = lambda bn, bk, w=4, sk=1: KernelConfig(kind="mma", block_n=bn, block_k=bk, num_warps=w, split_k=sk)  # noqa: E731

if GPU:
    SHAPES = [(4096, 4096, 64), (11008, 4096, 64), (4096, 11008, 64), (8192, 8192, 64), (4000, 4160, 64),
              (1000, 4096, 128), (300, 1024, 32), (100, 256, 64), (72, 128, 64)]
    CONFIGS = [C(128, 128), C(128, 256, 4, 2), C(256, 128, 8, 4), C(64, 64, 4, 3), C(128, 128, 8)]
    MS = [1, 2, 5, 8, 9, 13, 16]
else:
    SHAPES = [(40, 256, 64), (72, 128, 32)]
    CONFIGS = [C(64, 128), C(32, 64, 2, 3)]
    MS = [3, 16]
IDS = [f"n{n}-k{k}-g{g}" for n, k, g in SHAPES]


def test_config_names_and_checks():
    for cfg in CONFIGS:
        assert KernelConfig.parse(cfg.short()) == cfg
    assert C(128, 128, 4, 2).short() == "mma128x128w4sk2"
    with pytest.raises(ValueError, match="block_k 64, 128 or 256"):
        C(128, 512)
    with pytest.raises(ValueError, match="multiple of 16 \\* num_warps"):
        C(100, 128)
    assert launch.config_fits(C(128, 128), 32) and not launch.config_fits(C(128, 256), 32)
    with pytest.raises(ValueError, match="block_k <= 128"):
        launch.check_config(C(128, 256), 32)


@pytest.mark.parametrize("n,k,g", SHAPES, ids=IDS)
def test_mma16_matches_reference(n, k, g):
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=n + k)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    i = 0
    for m in MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).half().to(DEVICE)
        ref = reference(x, packed, a1, a2, bias, k, g)
        ref_nb = reference(x, packed, a1, a2, None, k, g)
        for cfg in CONFIGS:
            if not launch.config_fits(cfg, g) or not mma_applies(x, k, g, cfg.block_k):
                continue
            with_bias = i % 2 == 0
            i += 1
            y = launch_mma16(x, gw, bias if with_bias else None, cfg, strided=GPU and i % 3 == 0)
            assert y.shape == (m, n) and y.dtype == torch.float16
            assert_close(y, ref if with_bias else ref_nb, torch.float16)
    assert i


def test_mma16_split_is_deterministic_and_writes_only_its_slice():
    n, k, g = 72, 256, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=5)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    cfg = C(64, 128, 4, 2)
    a = launch_mma16(x, gw, bias, cfg)
    assert torch.equal(a, launch_mma16(x, gw, bias, cfg))
    wide = torch.zeros(6, n + 6, dtype=torch.float16, device=DEVICE)
    launch_mma16(x, gw, bias, cfg, out=wide[:, 3:3 + n])
    assert torch.equal(wide[:, 3:3 + n], a) and not wide[:, :3].any() and not wide[:, 3 + n:].any()
    assert_close(a, reference(x, packed, a1, a2, bias, k, g), torch.float16)


def test_mma16_falls_back_where_it_cannot_read():
    """bf16, K not a multiple of the chunk, more than 16 rows, unaligned rows: the fused kernel's default."""
    n, k, g = 40, 320, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=9)
    cfg = C(64, 256)
    cases = [(torch.float16, 4), (torch.float16, 17)] + ([(torch.bfloat16, 4)] if GPU else [])
    for dtype, m in cases:  # K = 320: not whole chunks
        gw = dbt.to_gpu_layout(packed, a1, a2, k, g, dtype)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
        assert not mma_applies(x, k, g, cfg.block_k)
        y = launch_mma16(x, gw, bias, cfg)
        assert_close(y, reference(x, packed, a1, a2, bias, k, g), dtype)
    if GPU:  # a row stride the 16-byte loads cannot follow
        gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
        base = torch.randn(3, k + 2, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
        x = base[:, :k]
        assert not mma_applies(x, k, g, 64)
        assert_close(launch_mma16(x, gw, bias, C(64, 64)), reference(x, packed, a1, a2, bias, k, g), torch.float16)
