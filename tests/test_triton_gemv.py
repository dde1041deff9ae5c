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
from dbllm_compile.backends.triton import launch, splitk, tuning
from dbllm_compile.backends.triton.launch import KernelConfig

GEMV = KernelConfig(kind="gemv", block_n=16, block_k=128, num_warps=2, num_stages=1)

if GPU:
    SHAPES = [(4096, 4096, 64), (11008, 4096, 64), (4000, 4160, 64), (1000, 4100, 64), (300, 1000, 32),
              (4096, 1024, 128), (576, 576, 64), (28672, 8192, 64), (4096, 11008, 64)]
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


def test_gemv_tiles_wider_than_the_layout_alignment_need_whole_tiles():
    """block_k 2048 (gemv only): runs where K is a multiple of it, a clear error elsewhere."""
    n, g = 8, 64
    wide = KernelConfig(kind="gemv", block_n=2, block_k=2048, num_warps=2, num_stages=1)
    assert launch.config_fits(wide, g) and not launch.config_fits(KernelConfig(block_k=2048), g)
    assert not launch.config_fits(KernelConfig(kind="gemv", block_k=3072), g)
    for k in (4096, 3072):
        packed, a1, a2, bias, _ = make_layer(n, k, g, seed=k)
        gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
        if k % 2048 == 0:
            assert_close(launch.run_config(x, gw, bias, wide), reference(x, packed, a1, a2, bias, k, g), torch.float16)
        else:
            with pytest.raises(ValueError, match="multiple of 2048"):
                launch.run_config(x, gw, bias, wide)


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


def test_gemv_candidates_are_valid_and_split_only_where_k_has_the_tiles():
    """``tuning._GEMV`` x splits: every candidate fits the group size, launches exactly
    ``split_k`` splits and gives each thread at least one code word; the 1024-wide tiles are
    tried on the Llama shapes, and SmolLM2's K (576: one 1024 tile, 1536: two) drops the splits
    their tiles cannot fill."""
    gemv = lambda n, k, g: [c for c in tuning.candidates(1, n, k, g, sms=132, dtype=torch.float16)  # noqa: E731
                            if c.kind == "gemv"]
    for n, k in [(4096, 4096), (4096, 11008), (28672, 8192), (576, 576), (1536, 576), (576, 1536)]:
        for g in (32, 64, 128):
            cands = gemv(n, k, g)
            assert cands and len({c.short() for c in cands}) == len(cands)
            for c in cands:
                launch.check_config(c, g)
                assert splitk.split_plan(k, c.block_k, c.split_k)[1] == c.split_k, (k, c.short())
                assert c.block_n * c.block_k // 16 >= 32 * c.num_warps, c.short()
    names = {c.short() for c in gemv(4096, 4096, 64)}
    assert {"gemv4x1024w1s3", "gemv4x1024w2s3sk4", "gemv2x1024w1s3sk2", "gemv16x512w1s3"} <= names
    assert len(names) == len(tuning._GEMV) * len(tuning._GEMV_SPLITS)  # 4096 / 1024 = 4 tiles: all splits
    k576 = {c.short() for c in gemv(576, 576, 64)}
    assert {"gemv4x1024w1s3", "gemv4x512w1s3sk2"} <= k576
    assert not any(c.block_k == 1024 and c.split_k > 1 for c in gemv(576, 576, 64))
    assert {c.split_k for c in gemv(576, 1536, 64) if c.block_k == 1024} == {1, 2}


# ---------------------------------------------------------------- which loads (LOADS) the gemv uses

GEMV512 = KernelConfig(kind="gemv", block_n=4, block_k=512, num_warps=1, num_stages=3)


def _pairs(rows: int, width: int, start: int, k: int) -> torch.Tensor:
    """fp16 pairs of ``x = buf[:, start:start + k]`` of a ``[rows, width]`` buffer, as ``launch_gemv``
    passes them (``x.view(torch.int32)``): storage offset ``start / 2``, row stride ``width / 2`` pairs."""
    x = torch.zeros(rows, width, dtype=torch.float16)[:, start:start + k]
    return x.view(torch.int32)


@pytest.fixture
def compiled(monkeypatch):
    """``_gemv_loads`` as on a GPU (no interpreter), default ``DBLLM_GEMV_LOADS``."""
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.delenv("DBLLM_GEMV_LOADS", raising=False)


def test_gemv_loads_default_is_all_asm_for_aligned_whole_tiles(compiled):
    xp = _pairs(1, 4096, 0, 4096)
    assert (xp.storage_offset(), xp.shape) == (0, (1, 2048))
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 2
    xp = _pairs(1, 4096 + 16, 8, 4096)  # 8 halves = 4 pairs = 16 bytes in: still aligned
    assert xp.storage_offset() == 4 and launch._gemv_loads(xp, 1, 4096, GEMV512) == 2


def test_gemv_loads_partial_k_tile_needs_whole_words(compiled, monkeypatch):
    k = 4160  # 8 tiles of 512 and a partial one; 260 whole words of 16
    xp = _pairs(1, k, 0, k)
    assert launch._gemv_loads(xp, 1, k, GEMV512) == 2
    assert launch._gemv_loads(_pairs(1, 576, 0, 576), 1, 576,
                              KernelConfig(kind="gemv", block_n=4, block_k=1024, num_warps=1)) == 2
    k = 4168  # not a multiple of 16: a word would be split
    assert launch._gemv_loads(_pairs(1, k, 0, k), 1, k, GEMV512) == 0
    monkeypatch.setenv("DBLLM_GEMV_LOADS", "1")  # x-only asm loads: whole tiles only
    assert launch._gemv_loads(xp, 1, 4160, GEMV512) == 0
    assert launch._gemv_loads(_pairs(1, 4096, 0, 4096), 1, 4096, GEMV512) == 1


@pytest.mark.parametrize("start", [2, 4, 6, 10])
def test_gemv_loads_is_tl_load_for_x_not_16_byte_aligned(compiled, start):
    """Storage offsets of 1, 2, 3 and 5 pairs (4-byte aligned: the gemv runs, but not vectorised)."""
    xp = _pairs(1, 4096 + 16, start, 4096)
    assert xp.storage_offset() == start // 2
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 0


def test_gemv_loads_checks_the_row_stride_with_several_rows_only(compiled):
    aligned = _pairs(3, 4096 + 8, 0, 4096)  # row stride 2052 pairs = 4 x 513
    assert aligned.stride(0) == 2052 and launch._gemv_loads(aligned, 3, 4096, GEMV512) == 2
    odd = _pairs(3, 4096 + 4, 0, 4096)  # row stride 2050 pairs: row 1 starts 8 bytes off
    assert odd.stride(0) == 2050 and launch._gemv_loads(odd, 3, 4096, GEMV512) == 0
    one = _pairs(1, 4096 + 4, 0, 4096)  # a single row: its stride is never used
    assert one.stride(0) == 2050 and launch._gemv_loads(one, 1, 4096, GEMV512) == 2


def test_gemv_loads_follows_the_environment(compiled, monkeypatch):
    xp = _pairs(1, 4096, 0, 4096)
    monkeypatch.setenv("DBLLM_GEMV_LOADS", "1")
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 1
    assert launch._gemv_loads(_pairs(1, 4096 + 16, 2, 4096), 1, 4096, GEMV512) == 0  # x vectors: aligned only
    monkeypatch.setenv("DBLLM_GEMV_LOADS", "0")
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 0
    monkeypatch.setenv("DBLLM_GEMV_LOADS", "2")
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 2


@pytest.mark.parametrize("bad", ["3", "asm", ""])
def test_gemv_loads_rejects_an_unknown_mode(compiled, monkeypatch, bad):
    monkeypatch.setenv("DBLLM_GEMV_LOADS", bad)
    with pytest.raises(ValueError, match="DBLLM_GEMV_LOADS must be 0, 1 or 2"):
        launch._gemv_loads(_pairs(1, 4096, 0, 4096), 1, 4096, GEMV512)


def test_gemv_loads_is_tl_load_under_the_interpreter(monkeypatch):
    """No inline asm in the interpreter: 0 whatever ``DBLLM_GEMV_LOADS`` asks for."""
    xp = _pairs(1, 4096, 0, 4096)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for want in ("1", "2"):
        monkeypatch.setenv("DBLLM_GEMV_LOADS", want)
        assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the same call compiled: all asm
    assert launch._gemv_loads(xp, 1, 4096, GEMV512) == 2
