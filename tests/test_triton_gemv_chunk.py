"""The chunk gemv (``backends/triton/gemv_chunk.py``, config kind ``gemvc``) against the reference.

Without a GPU: Triton's interpreter (plain loads, float32 sums). On a GPU: the inline-asm path
(16-byte code loads, ``f16x2`` word sums), on the issue's shapes and odd ones (N not a
multiple of the block, K not a multiple of the tile, of 64 or of 16, K = G), every variant
(``SUM16``, ``PREFETCH_X``), split-K, the GLU epilogue, and x the asm loads cannot read
(the word gemv runs then). Same tolerance as the other kernels (``triton_setup.assert_close``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from triton_setup import DEVICE, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: F401
import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends import triton as dbt
from dbllm_compile.backends.triton import launch
from dbllm_compile.backends.triton.launch import KernelConfig

C = lambda bn, bk, w=1, sk=1: KernelConfig(kind="gemvc", block_n=bn, block_k=bk, num_warps=w,  # noqa: E731
                                           num_stages=3, split_k=sk)

if GPU:
    SHAPES = [(4096, 4096, 64), (11008, 4096, 64), (4096, 11008, 64), (28672, 8192, 64), (4000, 4160, 64),
              (1000, 4112, 64), (300, 1024, 32), (4096, 1024, 128), (576, 576, 64), (1536, 576, 16),
              (100, 64, 64)]
    CONFIGS = [C(4, 1024), C(8, 1024), C(16, 1024, 2), C(4, 2048), C(8, 2048, 1, 2), C(16, 2048, 2, 4),
               C(4, 1024, 1, 4)]
    VARIANTS = [dict(sum16=s, prefetch_x=p) for s, p in itertools.product((1, 2, 4), (True, False))]
else:
    SHAPES = [(40, 128, 64), (33, 64, 64), (20, 192, 32), (12, 256, 16), (7, 512, 128), (6, 1040, 64),
              (5, 1104, 64)]
    CONFIGS = [C(8, 256), C(4, 128, 1, 2), C(16, 2048)]
    VARIANTS = [dict(prefetch_x=True), dict(prefetch_x=False)]
IDS = [f"n{n}-k{k}-g{g}" for n, k, g in SHAPES]


@pytest.mark.parametrize("n,k,g", SHAPES, ids=IDS)
def test_chunk_gemv_matches_reference(n, k, g):
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=n + k)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half().to(DEVICE)
    ref = reference(x, packed, a1, a2, bias, k, g)
    ref_nb = reference(x, packed, a1, a2, None, k, g)
    i = 0
    for cfg in CONFIGS:
        if not launch.config_fits(cfg, g):
            continue
        for var in VARIANTS:
            with_bias = i % 2 == 0
            i += 1
            y = launch.launch_gemv(x, gw, bias if with_bias else None, cfg, variant=var)
            assert y.shape == (1, n) and y.dtype == torch.float16
            assert_close(y, ref if with_bias else ref_nb, torch.float16)
    assert i


def test_chunk_gemv_glu_split_and_rows():
    """GLU epilogue, a deterministic split-K into a row-stride output, several rows of x."""
    n, k, g = 48, 1024, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=11)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    ref = reference(x, packed, a1, a2, bias, k, g)
    cfg = C(8, 256, 1, 2)
    assert_close(launch.launch_gemv(x, gw, bias, cfg), ref, torch.float16)
    one = x[:1]
    a = launch.launch_gemv(one, gw, bias, cfg)
    assert torch.equal(a, launch.launch_gemv(one, gw, bias, cfg))
    wide = torch.zeros(1, n + 6, dtype=torch.float16, device=DEVICE)
    launch.launch_gemv(one, gw, bias, cfg, out=wide[:, 3:3 + n])
    assert torch.equal(wide[:, 3:3 + n], a) and not wide[:, :3].any() and not wide[:, 3 + n:].any()
    glu = launch.launch_gemv(one, gw, None, C(8, 256), glu=True)
    h = n // 2
    r = reference(one, packed, a1, a2, None, k, g)
    want = torch.nn.functional.silu(r[:, :h]) * r[:, h:]
    assert_close(glu, want, torch.float16)


def test_chunk_gemv_falls_back_to_the_word_gemv_where_its_loads_cannot_read_x():
    """K not a multiple of 16 (a word would be split), and (compiled only) rows not 16-byte aligned."""
    k, g = 200, 64
    packed, a1, a2, bias, _ = make_layer(10, k, g, seed=1)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    assert not launch.chunk_loads_apply(x.view(torch.int32), k)
    y = launch.launch_gemv(x, gw, bias, C(8, 2048))
    assert_close(y, reference(x, packed, a1, a2, bias, k, g), torch.float16)
    if GPU:
        k = 256
        packed, a1, a2, bias, _ = make_layer(10, k, g, seed=2)
        gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
        buf = torch.randn(1, k + 2, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
        x = buf[:, 2:]  # 4-byte but not 16-byte aligned
        assert not launch.chunk_loads_apply(x.view(torch.int32), k)
        assert_close(launch.launch_gemv(x, gw, bias, C(8, 256)), reference(x, packed, a1, a2, bias, k, g),
                     torch.float16)


def test_chunk_gemv_names_parse():
    cfg = C(8, 2048, 2, 4)
    assert cfg.short() == "gemvc8x2048w2s3sk4" and KernelConfig.parse(cfg.short()) == cfg
    assert KernelConfig.parse("gemv8x1024w1s3").kind == "gemv"
    assert launch.config_fits(C(4, 2048), 64) and launch.config_fits(C(4, 1024), 16)


def test_chunk_gemv_is_a_batch_1_candidate_unless_switched_off(monkeypatch):
    from dbllm_compile.backends.triton import splitk, tuning

    names = lambda: {c.short() for c in tuning.candidates(1, 4096, 4096, 64, sms=132,  # noqa: E731
                                                          dtype=torch.float16) if c.kind == "gemvc"}
    assert len(names()) == len(tuning._GEMVC) * len(tuning._GEMV_SPLITS) - 4  # 2048-wide: 2 tiles, no split 4
    assert "gemvc8x2048w1s3sk2" in names() and "gemvc16x1024w1s3sk4" in names()
    for c in tuning.candidates(1, 576, 576, 64, sms=132, dtype=torch.float16):
        if c.kind == "gemvc":
            assert c.split_k == 1 and splitk.split_plan(576, c.block_k, 1)[1] == 1
    assert not any(c.kind == "gemvc" for c in tuning.candidates(16, 4096, 4096, 64, sms=132))
    assert not any(c.kind == "gemvc" for c in tuning.candidates(1, 4096, 4096, 64, sms=132, dtype=torch.bfloat16))
    monkeypatch.setenv("DBLLM_TRITON_GEMVC", "0")
    assert not names()
    # a tie within the margin goes to the gemv kinds (fewer launches first)
    cands = [C(8, 2048), KernelConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)]
    assert tuning.pick(cands, {cands[0].short(): 1.02, cands[1].short(): 1.0}) == cands[0]


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (programmatic dependent launch)")
def test_chunk_gemv_with_pdl_equals_the_plain_launch():
    n, k, g = 4096, 4096, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=4)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    for cfg, glu in ((C(8, 2048), False), (C(16, 1024, 1, 2), False), (C(8, 2048), True)):
        plain = launch.launch_gemv(x, gw, None if glu else bias, cfg, glu=glu, pdl=False)
        assert torch.equal(plain, launch.launch_gemv(x, gw, None if glu else bias, cfg, glu=glu, pdl=True))


def test_chunk_gemv_reads_a_single_row_with_an_odd_row_stride():
    """A row sliced out of a wider buffer (odd row stride, unused for one row) still runs."""
    n, k, g = 16, 256, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=6)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    buf = torch.randn(2, k + 1, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    x = buf[:1, :k]
    assert x.stride(0) % 2 == 1
    assert_close(launch.launch_gemv(x, gw, bias, C(8, 256)), reference(x, packed, a1, a2, bias, k, g), torch.float16)
