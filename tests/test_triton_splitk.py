"""Split-K decode path (backends/triton/splitk.py) against the reference, its configs and heuristics.

Without a GPU the kernels run in Triton's interpreter on tiny shapes (fp16 only, see
``test_triton_kernels.py``); with a GPU every decode tuning candidate runs on real shapes in
fp16 and bf16, plus a CUDA-graph capture and the two entry points with a forced split config.
Tolerances as in ``test_triton_kernels.py``: the partials are float32, so split-K changes only
the order of the float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from triton_setup import DEVICE, DTYPES, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: F401
import dbllm_compile.backends  # noqa: F401  (registers the CUDA kernel and db_linear_gpu)
from dbllm_compile.backends import triton as dbt
from dbllm_compile.backends.triton import launch, splitk, tuning
from dbllm_compile.backends.triton.launch import KernelConfig

BENCH_SHAPES = {(4096, 4096): 4, (11008, 4096): 4, (4096, 11008): 8, (8192, 8192): 4, (28672, 8192): 2,
                (576, 576): 1, (1536, 576): 1, (576, 1536): 1}  # (N, K): default split on 132 SMs


@pytest.fixture
def reduce_calls(monkeypatch):
    """Records the workspace shape of every reduce launch (proves the split path ran)."""
    calls = []
    real = splitk.launch_reduce

    def spy(ws, bias, out, wrap=False):
        calls.append(tuple(ws.shape))
        return real(ws, bias, out, wrap)

    monkeypatch.setattr(splitk, "launch_reduce", spy)
    return calls


# ---------------------------------------------------------------- plan and heuristics (pure)

def test_split_plan_uses_whole_tiles_and_drops_empty_splits():
    assert splitk.split_plan(4096, 256, 4) == (4, 4)
    assert splitk.split_plan(4096, 256, 3) == (6, 3)  # 6 + 6 + 4 tiles
    assert splitk.split_plan(576, 64, 8) == (2, 5)  # 9 tiles: 3 of the 8 splits would be empty
    assert splitk.split_plan(64, 64, 4) == (1, 1)  # K = one tile: no split
    assert splitk.split_plan(11008, 256, 16) == (3, 15)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        splitk.split_plan(1024, 256, 0)


@pytest.mark.parametrize("nk,split", list(BENCH_SHAPES.items()), ids=[f"{n}x{k}" for n, k in BENCH_SHAPES])
def test_default_split_k_on_benchmark_shapes(nk, split):
    n, k = nk
    assert splitk.default_split_k(n, k, 64, 256, 132) == split
    cfg = tuning.default_config(1, n, k, 64, sms=132)
    assert cfg.split_k == split and (cfg.block_n, cfg.block_k) == (64, 256)
    assert tuning.default_config(16, n, k, 64, sms=132) == cfg  # one decode default for M <= 16
    assert tuning.default_config(17, n, k, 64, sms=132).split_k == 1  # prefill: never split


def test_default_split_k_follows_the_sm_count_and_split_length():
    assert splitk.default_split_k(4096, 4096, 64, 256, sms=16) == 1  # 64 programs already fill 16 SMs
    assert splitk.default_split_k(4096, 4096, 64, 256, sms=264) == 4  # capped: >= 4 tiles per split
    assert splitk.default_split_k(4096, 65536, 64, 256, sms=1000) == 8  # capped at max_split
    assert splitk.default_split_k(4096, 1024, 64, 256) == 1  # 4 tiles: too short to split


@pytest.mark.parametrize("nk", list(BENCH_SHAPES), ids=[f"{n}x{k}" for n, k in BENCH_SHAPES])
def test_decode_candidates(nk):
    n, k = nk
    cands = tuning.candidates(1, n, k, 64, sms=132, dtype=torch.bfloat16)  # the fused kernel's (gemvs: fp16, M = 1)
    assert tuning.candidates(16, n, k, 64, sms=132, dtype=torch.bfloat16) == cands
    m16 = tuning.candidates(16, n, k, 64, sms=132)  # fp16, 2 <= M <= 16: the mma kernel's after the fused ones
    assert m16[:len(cands)] == cands and {c.kind for c in m16[len(cands):]} == ({"mma"} if k % 128 == 0 else set())
    assert all(k % c.block_k == 0 and splitk.split_plan(k, c.block_k, c.split_k)[1] == c.split_k
               for c in m16[len(cands):])
    m1 = tuning.candidates(1, n, k, 64, sms=132)
    assert m1[:len(cands)] == cands and {c.kind for c in m1[len(cands):]} == {"gemv", "gemvc"}  # both gemvs
    assert any(c.split_k > 1 for c in m1[len(cands):])
    names = [c.short() for c in m1]
    assert len(set(names)) == len(names) and len(cands) <= 12
    split = [c for c in cands if c.split_k > 1]
    assert split, "every benchmark shape gets split-K candidates"
    for c in split:
        per, splits = splitk.split_plan(k, c.block_k, c.split_k)
        assert splits == c.split_k and per >= 2  # launches exactly split_k splits of >= 2 tiles
        assert -(-n // c.block_n) * splits <= 4 * 132 * splitk.RESIDENT_PER_SM
    default = tuning.default_config(1, n, k, 64, sms=132)
    assert default in cands  # the tuner always measures the untuned default
    assert all(c.split_k == 1 for c in tuning.candidates(17, n, k, 64, sms=132))


def test_tuning_pick_prefers_fewer_launches_within_margin():
    gemv = KernelConfig(kind="gemv", block_n=2, block_k=1024, num_warps=1)
    gemv_sk = dataclasses.replace(gemv, split_k=4)
    fused_sk = KernelConfig(block_m=16, block_n=128, block_k=256, split_k=4)
    fused = KernelConfig(block_m=16, block_n=64, block_k=256)
    ms = {gemv.short(): 8.2, gemv_sk.short(): 8.0, fused_sk.short(): 7.95, fused.short(): 8.1}
    # all within 4% of 7.95: single launch first, then the gemv kind
    assert tuning.pick([fused_sk, gemv_sk, fused, gemv], ms) == gemv
    assert tuning.pick([fused_sk, gemv_sk, fused], ms) == fused
    # a clear win (more than the margin) is kept even with more launches
    ms[fused_sk.short()] = 6.0
    assert tuning.pick([fused_sk, gemv_sk, fused, gemv], ms) == fused_sk
    assert tuning.launches(KernelConfig(kind="dequant")) == 2 and tuning.launches(gemv_sk) == 2


# ---------------------------------------------------------------- config names, errors, cache

def test_config_names_round_trip_and_old_names_parse():
    cfgs = [c for nk in BENCH_SHAPES for m in (1, 64, 300) for c in tuning.candidates(m, *nk, 64, sms=132)]
    assert any(c.kind == "dequant" for c in cfgs) and any(c.swap for c in cfgs)
    for c in cfgs + [KernelConfig(block_m=16, block_n=32, block_k=64, swap=True, split_k=3)]:
        assert KernelConfig.parse(c.short()) == c
        assert KernelConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert KernelConfig(split_k=4).short().endswith("s3sk4")
    old = KernelConfig.parse("m16n64k256g1w4s4")  # a name from before split-K
    assert old == KernelConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4) and old.split_k == 1
    assert KernelConfig.parse("m128n256k64g8w8s3x").swap
    assert KernelConfig.parse("dequant32x512w4c1024+cublas").chunk_n == 1024
    legacy = KernelConfig(block_n=64, block_k=256, num_stages=4).to_json()
    del legacy["split_k"]
    assert KernelConfig.from_json(legacy).split_k == 1
    with pytest.raises(ValueError, match="not a kernel config name"):
        KernelConfig.parse("m16n64k256")
    with pytest.raises(ValueError, match="unknown fields"):
        KernelConfig.from_json({**legacy, "persistent": True})


def test_bad_configs_name_the_config_and_the_fix():
    with pytest.raises(ValueError, match=r"m16n64k512g1w4s3sk0: split_k must be an int >= 1"):
        KernelConfig(split_k=0)
    with pytest.raises(ValueError, match=r"dequant32x512w4\+cublas: split_k=2 applies to the fused and gemv kernels only"):
        KernelConfig(kind="dequant", block_n=32, split_k=2)
    packed, a1, a2, _, _ = make_layer(8, 256, 64)
    gw = dbt.to_gpu_layout(packed, a1, a2, 256, 64, torch.float16)
    x = torch.randn(1, 256).half().to(DEVICE)
    with pytest.raises(ValueError, match=r"m16n32k32g1w4s3sk2 has block_k=32.*use block_k in \[64, 128"):
        dbt.run_config(x, gw, None, KernelConfig(block_n=32, block_k=32, split_k=2))


def test_cache_reads_version_1_as_split_1_and_writes_version_2(tmp_path, monkeypatch):
    monkeypatch.setenv("DBLLM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", None)
    path = tuning.cache_path(DEVICE)
    old_entry = KernelConfig(block_n=64, block_k=256, num_stages=4).to_json()
    del old_entry["split_k"]
    key_old = tuning.cache_key(torch.float16, 4096, 4096, 64, 1)
    path.write_text(json.dumps({"version": 1, "gpu": "x", "triton": "3.6.0",
                                "configs": {key_old: old_entry, "bad": {"block_q": 1}}}))
    assert tuning.lookup(DEVICE, torch.float16, 1, 4096, 4096, 64) == KernelConfig(block_n=64, block_k=256,
                                                                                   num_stages=4)
    split = KernelConfig(block_n=64, block_k=256, num_stages=4, split_k=4)
    key_new = tuning.cache_key(torch.float16, 8192, 8192, 64, 16)
    tuning._store(DEVICE, key_new, split)
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and set(doc["configs"]) == {key_old, key_new}  # migrated, bad entry dropped
    assert doc["configs"][key_old]["split_k"] == 1
    monkeypatch.setattr(tuning, "_memory", None)  # a new process
    assert tuning.lookup(DEVICE, torch.float16, 3, 8192, 8192, 64) == split
    path.write_text(json.dumps({"version": 99, "configs": {key_new: {"anything": 1}}}))
    monkeypatch.setattr(tuning, "_memory", None)
    assert tuning.lookup(DEVICE, torch.float16, 16, 8192, 8192, 64) is None  # unknown version: tune again


# ---------------------------------------------------------------- kernels (interpreter on CPU)

# (M, N, K, G, BLOCK_N, BLOCK_K, SPLIT_K, swap): K tiles / splits launched in the comment
SPLIT_CASES = [
    (1, 40, 512, 64, 32, 64, 2, False),  # 8 tiles, 2 splits of 4
    (3, 50, 300, 32, 32, 64, 3, False),  # 5 tiles (last one partial), splits 2+2+1
    (7, 70, 448, 64, 32, 64, 4, False),  # 7 tiles, splits 2+2+2+1
    (16, 33, 576, 64, 32, 64, 8, False),  # 9 tiles: 5 splits of 2+..+1, 3 would be empty
    (2, 40, 200, 32, 16, 32, 8, False),  # 7 tiles, one per split, 7 splits
    (1, 24, 64, 64, 32, 64, 4, False),  # K = G = one tile: single kernel
    (5, 20, 256, 64, 16, 64, 3, True),  # swapped orientation, 4 tiles, splits 2+2
]
SPLIT_IDS = [f"m{c[0]}-n{c[1]}-k{c[2]}-g{c[3]}-bk{c[5]}-sk{c[6]}" + ("-swap" if c[7] else "") for c in SPLIT_CASES]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k,g,bn,bk,split,swap", SPLIT_CASES, ids=SPLIT_IDS)
def test_split_k_matches_reference(m, n, k, g, bn, bk, split, swap, with_bias, reduce_calls):
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=m + n)
    bias = bias if with_bias else None
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).half().to(DEVICE)
    cfg = KernelConfig(block_m=16, block_n=bn, block_k=bk, swap=swap, num_warps=2, num_stages=2, split_k=split)
    y = dbt.run_config(x, gw, bias, cfg)
    assert y.shape == (m, n) and y.dtype == torch.float16 and torch.isfinite(y).all()
    assert_close(y, reference(x, packed, a1, a2, bias, k, g), torch.float16)
    per, splits = splitk.split_plan(k, bk, split)
    assert reduce_calls == ([] if splits == 1 else [(splits, m, n)])


def test_split_k_is_deterministic_and_close_to_unsplit():
    """Two runs, and the ``wrap_triton`` launch of the ``triton_op``, are bit-identical."""
    m, n, k, g = 3, 40, 576, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=5)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    cfg = KernelConfig(block_m=16, block_n=32, block_k=64, num_stages=2, split_k=4)
    y1, y2 = dbt.run_config(x, gw, bias, cfg), dbt.run_config(x, gw, bias, cfg)
    assert torch.equal(y1, y2)
    assert torch.equal(dbt.run_config(x, gw, bias, cfg, wrap=True), y1)  # as db_linear_gpu launches it
    y0 = dbt.run_config(x, gw, bias, KernelConfig(block_m=16, block_n=32, block_k=64, num_stages=2))
    assert_close(y1, y0.float().cpu(), torch.float16)


@pytest.mark.parametrize("split", [1, 3])
def test_launch_writes_into_an_output_with_a_row_stride(split, reduce_calls):
    m, n, k, g = 5, 24, 256, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=2)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    buf = torch.full((m, n + 10), 7.0, dtype=torch.float16, device=DEVICE)
    out = buf[:, 4:4 + n]  # row stride n + 10
    cfg = KernelConfig(block_m=16, block_n=16, block_k=64, num_stages=2, split_k=split)
    assert launch.launch_matmul(x, gw, bias, cfg, out=out) is out
    assert_close(out, reference(x, packed, a1, a2, bias, k, g), torch.float16)
    assert (buf[:, :4] == 7).all() and (buf[:, 4 + n:] == 7).all()
    assert len(reduce_calls) == (split > 1)
    with pytest.raises(ValueError, match="unit stride along N"):
        launch.launch_matmul(x, gw, bias, cfg, out=buf[:, :2 * n:2])


def test_splits_past_the_real_k_store_zeros():
    """The kernel itself, launched with more splits than tiles: the extra ones write zero partials."""
    from dbllm_compile.backends.triton.kernels import db_matmul_kernel

    m, n, k, g, bk, splits = 2, 32, 128, 64, 64, 4  # 2 real tiles, 1 per split: splits 2 and 3 are empty
    packed, a1, a2, _, _ = make_layer(n, k, g, seed=4)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    ws = torch.full((splits, m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    db_matmul_kernel[(2, splits)](
        x, gw.qweight, gw.scales, gw.scales, ws, m, n, k, 1,
        x.stride(0), gw.qweight.stride(0), gw.scales.stride(0), ws.stride(1),
        GROUP=g, BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, GROUP_TILES=1, SWAP=False, EVEN_K=True,
        HAS_BIAS=False, IS_BF16=False, USE_ASM=not launch.interpreted(), SPLIT_K=splits, num_stages=2,
    )
    assert (ws[2:] == 0).all()
    assert_close(ws[:2].sum(0), reference(x, packed, a1, a2, None, k, g), torch.float16)


def test_dispatcher_runs_a_cached_split_config_on_3d_input(tmp_path, monkeypatch, reduce_calls):
    """``db_linear`` on CUDA (the interpreter on CPU) takes the split config from the tuning cache."""
    monkeypatch.setenv("DBLLM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", None)
    n, k, g = 40, 320, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=6)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    cfg = KernelConfig(block_m=16, block_n=32, block_k=64, num_stages=2, split_k=2)
    tuning._store(DEVICE, tuning.cache_key(torch.float16, n, k, g, 6), cfg)
    dbt.clear_cache()
    y = dbt.db_linear_cuda(x, packed, a1, a2, bias, k, g)
    assert y.shape == (2, 3, n) and reduce_calls == [(2, 6, n)]
    assert_close(y, reference(x.reshape(-1, k), packed, a1, a2, bias, k, g).reshape(2, 3, n), torch.float16)


# ---------------------------------------------------------------- GPU only

gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
GPU_SHAPES = [(1, 4096, 4096, 64), (16, 11008, 4096, 64), (1, 4096, 11008, 64), (3, 8192, 8192, 128),
              (1, 576, 576, 64), (7, 1536, 576, 32), (1, 576, 1536, 64), (1, 4000, 4160, 64)]


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m,n,k,g", GPU_SHAPES, ids=[f"m{m}-n{n}-k{k}-g{g}" for m, n, k, g in GPU_SHAPES])
def test_every_decode_candidate_on_real_shapes(m, n, k, g, dtype):
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=m + n)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    refs = {True: reference(x, packed, a1, a2, bias, k, g), False: reference(x, packed, a1, a2, None, k, g)}
    cands = tuning.candidates(m, n, k, g) + [tuning.default_config(m, n, k, g)]
    assert any(c.split_k > 1 for c in cands)
    for i, cfg in enumerate(cands):
        y = dbt.run_config(x, gw, bias if i % 2 == 0 else None, cfg)
        assert torch.isfinite(y).all(), cfg.short()
        assert_close(y, refs[i % 2 == 0], dtype)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_split_k_under_cuda_graph_and_both_entry_points(dtype, tmp_path, monkeypatch, reduce_calls):
    monkeypatch.setenv("DBLLM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", None)
    n, k, g = 4096, 4096, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=9)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, dtype)
    cfg = KernelConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=4)
    static_x = torch.randn(1, k, device=DEVICE, dtype=dtype)
    dbt.run_config(static_x, gw, bias, cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the workspace comes from the graph's pool
        static_y = dbt.run_config(static_x, gw, bias, cfg)
    for seed in (1, 2):
        x = torch.randn(1, k, device=DEVICE, dtype=dtype, generator=torch.Generator(DEVICE).manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        assert_close(static_y, reference(x, packed, a1, a2, bias, k, g), dtype)
    # both entry points, with the split config as the cached choice of their shape
    tuning._store(static_x.device, tuning.cache_key(dtype, n, k, g, 2), cfg)
    x = torch.randn(2, k, device=DEVICE, dtype=dtype)
    ref = reference(x, packed, a1, a2, bias, k, g)
    reduce_calls.clear()
    assert_close(torch.ops.dbllm.db_linear(x, packed, a1, a2, bias, k, g), ref, dtype)
    assert reduce_calls == [(4, 2, n)]
    assert_close(torch.ops.dbllm.db_linear_gpu(x, gw.qweight, gw.scales, bias, k, g), ref, dtype)
    f = torch.compile(lambda t: torch.ops.dbllm.db_linear_gpu(t, gw.qweight, gw.scales, bias, k, g), fullgraph=True)
    assert_close(f(x), ref, dtype)
