"""Choosing a kernel configuration per shape, and the on-disk cache of the choices.

Key: ``(dtype, N, K, G, M bucket)``; ``M`` is bucketed to ``max(16, next power of two)``, capped
at 8192. The first call of a key in a process benchmarks the candidates of its bucket
(:func:`candidates`) on the real inputs, with the L2 cache flushed before every timed run, and
stores the fastest (:func:`pick`: within 4% of it, fewer launches win) in
``$DBLLM_TRITON_CACHE_DIR`` (default ``~/.cache/dbllm_compile/triton``) as ``<gpu name>.json``;
later processes read the file and start without tuning. Inside CUDA graph capture, or under the
Triton interpreter, nothing is benchmarked: a cached choice or :func:`default_config` is used.

The file format (``version`` 2)::

    {"version": 2, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "configs": {"float16|N4096|K4096|G64|M16": {"kind": "fused", "block_m": 16, ..., "split_k": 4}}}

Version 2 added ``split_k``. Version 1 files (written before split-K) are still read, their
entries as ``split_k = 1``, and rewritten as version 2 at the next store; code that only knows
version 1 ignores version-2 files instead of failing on the new field. A migrated decode entry
was chosen among candidates without split-K: delete the file (or point
``DBLLM_TRITON_CACHE_DIR`` elsewhere) to tune those shapes again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.reference.dual_binary import padded_in_features

from .launch import KernelConfig, config_fits, interpreted, run_config
from .layout import K_ALIGN, GpuWeights
from .splitk import RESIDENT_PER_SM, default_split_k, sm_count, split_options, split_plan

__all__ = ["m_bucket", "cache_key", "candidates", "default_config", "lookup", "choose", "choose_traced", "cache_path"]

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: before split_k (entries load with split_k = 1)
_lock = threading.Lock()
_memory: dict[str, dict] | None = None  # key -> config json, as loaded from / written to disk


def m_bucket(m: int) -> int:
    """1 for ``m == 1`` (batch-1 decode has its own choice: the gemv kernel is tried there only),
    else ``max(16, next power of two >= m)``, capped at 8192."""
    if m == 1:
        return 1
    b = 16
    while b < m and b < 8192:
        b *= 2
    return b


def cache_key(dtype: torch.dtype, n: int, k: int, g: int, m: int) -> str:
    return f"{str(dtype).removeprefix('torch.')}|N{n}|K{k}|G{g}|M{m_bucket(m)}"


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def cache_path(device: torch.device) -> Path:
    """Where the chosen configurations of this GPU model live."""
    root = Path(os.environ.get("DBLLM_TRITON_CACHE_DIR", Path.home() / ".cache" / "dbllm_compile" / "triton"))
    return root / (re.sub(r"[^A-Za-z0-9_.-]+", "_", _gpu_name(device)) + ".json")


def _load(device: torch.device) -> dict[str, dict]:
    global _memory
    if _memory is None:
        _memory = {}
        path = cache_path(device)
        try:
            _memory.update(_read_configs(path))
        except (OSError, ValueError):
            pass  # no cache yet, or unreadable: tune again
    return _memory


def _read_configs(path: Path) -> dict[str, dict]:
    """The valid entries of a cache file of a readable version (others are dropped: tuned again)."""
    data = json.loads(path.read_text())
    if data.get("version") not in READ_VERSIONS:
        return {}
    configs = {}
    for key, d in data.get("configs", {}).items():
        try:
            configs[key] = KernelConfig.from_json(d).to_json()  # version 1: split_k filled in as 1
        except (TypeError, ValueError) as e:
            _log(f"ignoring cache entry {key} of {path}: {e}")
    return configs


def _store(device: torch.device, key: str, cfg: KernelConfig) -> None:
    mem = _load(device)
    mem[key] = cfg.to_json()
    path = cache_path(device)
    try:
        import triton

        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {}
        try:
            merged.update(_read_configs(path))
        except (OSError, ValueError):
            pass
        merged.update(mem)
        doc = {"version": FORMAT_VERSION, "gpu": _gpu_name(device), "triton": triton.__version__,
               "configs": dict(sorted(merged.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: keep the choice for this process only


# Decode (M <= 16) block configurations without split: (BLOCK_N, BLOCK_K, warps, stages). Four
# earlier ones are dropped after the H100 run of 2026-11-23 (benchmarks/results/h100_2026-11-23.json,
# 10 decode cases): n64k128w4s6 (within 2.2% of n64k128w4s4 in every case), n128k256w8s4 (at
# most 1.8% faster than n128k256w4s4, up to 6.7% slower) and n128k128w4s4, n256k128w8s4 (6th
# to 9th of 9 in every case). n32k256w2s6 ranked as low but stays: the only narrow tile, for
# small N that run did not measure.
_DECODE = [(32, 256, 2, 6), (64, 128, 4, 4), (64, 256, 4, 4), (64, 512, 4, 3), (128, 256, 4, 4)]
# Block configurations tried with split-K: the two decode winners of that run, and for small
# layers (fewer N/64 x K/256 tiles than one wave of programs, e.g. SmolLM2-135M's 576 x 576)
# n64 and a narrower, shorter tile instead of n128 (which would only remove programs).
_SPLIT_BASES = [(64, 256, 4, 4), (128, 256, 4, 4)]
_SMALL_SPLIT_BASES = [(64, 256, 4, 4), (32, 128, 2, 4)]
# Batch 1, fp16: the gemv kernel (:mod:`.gemv`), (BLOCK_N, BLOCK_K, warps, stages), each with
# SPLIT_K 1, 2 and 4 where K has enough tiles. From sweeps on an H100 (2026-11-24,
# benchmarks/sweep_gemv.py, 6 shapes; raw benchmarks/results/gemv_h100_2026-11-24/): after the
# prefetch change, programs of one warp and 4-16 rows x 512 features were the fastest on every
# shape (warps 1-2 swept); before it, 2- and 4-warp programs had won 4096 x 4096. Programs of
# 128 rows left too few warps per SM (Nsight: 10.5% achieved occupancy).
# With every load in inline asm (``LOADS=2``, :func:`.launch._gemv_loads`), 1024-feature tiles
# won a later sweep on every shape (gemv_loads_h100_2026-11-24/sweep_loads2_bk512_1024.json);
# the four 1024-wide entries are those winners (each entry adds up to three timed configs per
# M = 1 shape, so 4096 x 4096's own winners are left out). 16 x 512 was kept for K that is not
# a multiple of the tile (4096 x 11008), which ran ``LOADS=0`` until the asm loads took partial
# last tiles; with them (and the last tile decoded after the loop), a sweep of 1-16 rows x
# 512-4096 features x 1-8 warps (gemv_peel_h100_2026-11-24/) had 2 x 1024 / 2 warps win
# 4096 x 11008 without split-K (15.6 us, was 17.2 with split-K 4 and LOADS=0), and the entries
# below within 3% of the best on the four Llama-2-7B shapes; 2048- and 4096-wide tiles gained
# at most 3% (4096 x 4096) and are not tried.
_GEMV = [(4, 512, 1, 3), (8, 512, 1, 3), (16, 512, 1, 3),
         (2, 1024, 1, 3), (4, 1024, 1, 3), (4, 1024, 2, 3), (8, 1024, 2, 3), (2, 1024, 2, 3), (8, 1024, 4, 3)]
_GEMV_SPLITS = (1, 2, 4)
# The chunk gemv (:mod:`.gemv_chunk`, kind ``gemvc``): (BLOCK_N, BLOCK_K, warps, stages) x the same
# splits. The five entries within 3-7% of the best chunk config on every Llama shape of the H100
# sweep (benchmarks/sweep_gemv_chunk.py, 2026-11-25; raw benchmarks/results/gemv_chunk_h100_2026-11-25/).
_GEMVC = [(16, 2048, 2, 3), (8, 2048, 1, 3), (8, 2048, 2, 3), (4, 2048, 1, 3), (16, 1024, 1, 3)]

# The mma kernel (:mod:`.mma16`, kind ``mma``, 2 <= M <= 16, fp16): (rows per program, chunk,
# warps, split_k), the fastest of the H100 sweep on 28672 x 8192 and 8192 x 8192 at M = 16
# (benchmarks/sweep_mma16.py, 2026-11-25; kernels.md "The mma kernel").
_MMA = [(256, 128, 4, 2), (256, 128, 4, 4), (128, 128, 4, 4), (128, 128, 4, 2), (128, 256, 4, 4)]


def candidates(m: int, n: int, k: int, g: int, sms: int | None = None,
               dtype: torch.dtype | None = None) -> list[KernelConfig]:
    """Configurations tried for this shape (filtered to those valid for ``g``).

    ``m == 1`` with ``dtype`` fp16 (or not given) adds the gemv kernels' configurations: the
    word gemv's (``_GEMV`` x ``_GEMV_SPLITS``, the splits that K's tiles allow: 27 on the Llama
    shapes, 12 for K = 576 and 18 for K = 1536 with G = 64) and the chunk gemv's (``_GEMVC`` x
    the same splits), unless ``DBLLM_TRITON_GEMV=0`` (neither) or ``DBLLM_TRITON_GEMVC=0`` (no
    chunk gemv), for before/after timings. ``2 <= m <= 16`` with fp16 adds the mma kernel's
    ``_MMA`` (unless ``DBLLM_TRITON_MMA=0``), whose launcher runs the fused default where it
    cannot read x.

    Decode (``m <= 16``): the block configurations of ``_DECODE`` without split, then split-K
    versions of ``_SPLIT_BASES`` (``_SMALL_SPLIT_BASES`` for layers whose ``N/64 x K/256``
    tiles are fewer than one wave) with the splits of :func:`.splitk.split_options`: program
    counts near one and two waves of ``sms`` SMs x :data:`.splitk.RESIDENT_PER_SM`, each split
    at least two K tiles long, plus the untuned default's split. ``sms`` defaults to the
    current GPU's SM count (:func:`.splitk.sm_count`).
    """
    F = KernelConfig
    if m <= 16:
        sms = sms or sm_count()
        c = [F(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=s) for bn, bk, w, s in _DECODE]
        small = -(-n // 64) * -(-k // 256) < sms * RESIDENT_PER_SM
        for bn, bk, w, s in _SMALL_SPLIT_BASES if small else _SPLIT_BASES:
            if bk % g == 0:
                c += [F(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=s, split_k=sk)
                      for sk in split_options(n, k, bn, bk, sms)]
        if m == 1 and dtype in (None, torch.float16) and os.environ.get("DBLLM_TRITON_GEMV", "1") != "0":
            c += [F(kind="gemv", block_n=bn, block_k=bk, num_warps=w, num_stages=s, split_k=sk)
                  for bn, bk, w, s in _GEMV for sk in _GEMV_SPLITS if split_plan(k, bk, sk)[1] == sk]
            if os.environ.get("DBLLM_TRITON_GEMVC", "1") != "0":
                c += [F(kind="gemvc", block_n=bn, block_k=bk, num_warps=w, num_stages=s, split_k=sk)
                      for bn, bk, w, s in _GEMVC for sk in _GEMV_SPLITS if split_plan(k, bk, sk)[1] == sk]
        if m >= 2 and dtype in (None, torch.float16) and os.environ.get("DBLLM_TRITON_MMA", "1") != "0":
            c += [F(kind="mma", block_n=bn, block_k=bk, num_warps=w, split_k=sk) for bn, bk, w, sk in _MMA
                  if k % bk == 0 and split_plan(k, bk, sk)[1] == sk]
    elif m <= 64:
        bm = 32 if m <= 32 else 64
        c = [F(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s) for bn, bk, w, s in [
            (32, 256, 2, 4), (64, 256, 4, 4), (128, 256, 4, 4), (128, 128, 4, 4), (256, 128, 8, 3)]]
    else:
        c = [F(block_m=bm, block_n=bn, block_k=bk, group_tiles=8, swap=sw, num_warps=w, num_stages=s)
             for bm, bn, bk, sw, w, s in [
                 (64, 128, 128, False, 4, 4), (128, 128, 128, False, 8, 3), (128, 256, 64, False, 8, 3),
                 (128, 128, 64, False, 8, 4), (128, 256, 64, True, 8, 3), (256, 128, 64, True, 8, 3),
                 (128, 128, 64, True, 4, 4)]]
        c.append(F(kind="dequant", block_n=32, block_k=512, num_warps=4))
        chunk = max(256, (24 * 2**20 // (2 * k)) // 256 * 256)  # a 24 MiB dense chunk stays in L2
        if chunk < n:
            c.append(F(kind="dequant", block_n=32, block_k=512, num_warps=4, chunk_n=chunk))
    return [x for x in c if config_fits(x, g)] or [default_config(m, n, k, g, sms)]


def default_config(m: int, n: int, k: int, g: int, sms: int | None = None) -> KernelConfig:
    """A reasonable configuration without tuning (interpreter, graph capture, traced ops).

    Decode: ``m16n64k256w4s4`` (the tuned choice in 8 of the 10 decode cases of the H100 run of
    2026-11-23) with the split of :func:`.splitk.default_split_k` for ``sms`` SMs (default: the
    current GPU's count). The earlier default, ``n32`` with 2 warps below N = 8192 and ``n128``
    above, was not timed itself; its nearest candidate below 8192, ``m16n32k256w2s6``, took
    1.3-2.0x the tuned time in that run.
    """
    bk = max(g, 256 if m <= 64 else 64)
    if m <= 16:
        split = default_split_k(n, k, 64, bk, sms or sm_count())
        return KernelConfig(block_m=16, block_n=64, block_k=bk, num_warps=4, num_stages=4, split_k=split)
    if m <= 64:
        return KernelConfig(block_m=32 if m <= 32 else 64, block_n=64, block_k=bk, num_warps=4, num_stages=4)
    return KernelConfig(block_m=128, block_n=128, block_k=bk, group_tiles=8, num_warps=8, num_stages=3)


def lookup(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, g: int) -> KernelConfig | None:
    """The cached choice for this shape, or None (never benchmarks)."""
    with _lock:
        d = _load(device).get(cache_key(dtype, n, k, g, m))
    return KernelConfig.from_json(d) if d else None


def _time_ms(fn, flush: torch.Tensor | None, reps: int) -> float:
    """Median time of ``fn`` replayed as a CUDA graph (no CPU launch overhead inside the timed
    region; falls back to timing eager calls where capture fails), with a cold L2 after
    zeroing ``flush`` (``None``: ``fn`` keeps it cold by itself)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # a configuration that cannot be captured still gets a time
        graph = None
        run = fn
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    times.sort()
    return times[len(times) // 2]


STACK_MAX_M = 16
"""Up to this batch the tuner times a stack of copies of the layer (:func:`_timing_stack`)."""


def _timing_stack(gw: GpuWeights, device: torch.device) -> list[GpuWeights]:
    """``gw`` and copies of it holding at least twice the L2 together (at most 32 layers and 5% of
    the free memory), or ``[gw]`` alone where they would not fit.

    Why: at decode batches the kernels stream their weights, and a model runs its layers back to
    back. One layer timed alone after an L2 flush also times the flush's write-back and the
    kernel's ramp-up alone; on the H100 that ranked the gemv kinds differently from a stack of
    layers (8192 x 8192: the chunk gemv 19.4 against 16.9 us alone, 13.3 against 14.5 us per
    layer in a stack; kernels.md), and the stack is what the model and the benchmark run.
    """
    nbytes = gw.qweight.numel() * gw.qweight.element_size() + gw.scales.numel() * gw.scales.element_size()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = min(32, math.ceil(2 * l2 / max(1, nbytes))) - 1
    if copies < 1 or (copies + 1) * nbytes > 0.05 * torch.cuda.mem_get_info(device)[0]:
        return [gw]
    return [gw] + [GpuWeights(gw.qweight.clone(), gw.scales.clone(), gw.in_features, gw.group_size)
                   for _ in range(copies)]


def tune(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, reps: int = 10) -> tuple[KernelConfig, dict]:
    """Benchmark every candidate on these inputs; return the fastest and ``{name: ms}``.

    Up to batch :data:`STACK_MAX_M` each candidate runs once per layer of :func:`_timing_stack`
    in one CUDA graph (a cold L2 by size), and its time is per layer; larger batches (compute-
    bound) and layers whose copies do not fit time one layer after flushing the L2.
    """
    m, k = x2.shape
    n, g = gw.out_features, gw.group_size
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=x2.device)  # larger than any L2
    stack = _timing_stack(gw, x2.device) if m <= STACK_MAX_M else [gw]
    if len(stack) > 1:
        del flush
        flush = None

    def timed(cfg):
        if len(stack) == 1:
            return _time_ms(lambda: run_config(x2, gw, bias, cfg), flush, reps)
        return _time_ms(lambda: [run_config(x2, w, bias, cfg) for w in stack], None, reps) / len(stack)

    results: dict[str, float] = {}
    sms = sm_count(x2.device)
    cands = candidates(m, n, k, g, sms, x2.dtype)
    for cfg in cands:
        try:
            run_config(x2, gw, bias, cfg)  # compile + warm up
            torch.cuda.synchronize(x2.device)
            ms = timed(cfg)
        except Exception as e:  # a config that does not compile here (e.g. out of shared memory)
            results[cfg.short()] = float("nan")
            _log(f"config {cfg.short()} failed for N={n} K={k} M={m}: {type(e).__name__}: {str(e)[:200]}")
            continue
        results[cfg.short()] = ms
    ran = [c for c in cands if not math.isnan(results.get(c.short(), math.nan))]
    if not ran:
        raise RuntimeError(f"db_linear (triton): no configuration ran for N={n} K={k} G={g} M={m}")
    # second pass over the three fastest: single cold runs of a few microseconds are noisy
    for cfg in sorted(ran, key=lambda c: results[c.short()])[:3]:
        again = timed(cfg)
        results[cfg.short()] = min(results[cfg.short()], again)
    return pick(ran, results), results


TIE_MARGIN = 0.04


def launches(cfg: KernelConfig) -> int:
    """Kernel launches per call: split-K adds the reduction; the dequant kind adds cuBLAS."""
    return 1 + (cfg.split_k > 1) + (cfg.kind == "dequant")


def pick(ran: list[KernelConfig], results: dict[str, float]) -> KernelConfig:
    """The fastest configuration, except that one within ``TIE_MARGIN`` (4%) of it with fewer
    launches wins, and among those a gemv kind (then the fastest).

    Why: times of a few microseconds measured one layer at a time move by a few percent from
    run to run, and in a model each extra launch also costs a gap between kernels that a lone
    layer's timing undercounts. Without the margin, fresh machines picked a split-K fused
    kernel for some batch-1 shapes in one run and the gemv in the next, and the model's decode
    speed moved with the choice."""
    best_ms = min(results[c.short()] for c in ran)
    close = [c for c in ran if results[c.short()] <= best_ms * (1 + TIE_MARGIN)]
    return min(close, key=lambda c: (launches(c), c.kind not in ("gemv", "gemvc"), results[c.short()]))


def choose(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None) -> KernelConfig:
    """Cached choice, else tune now (eager, outside graph capture), else the default."""
    m, k = x2.shape
    n, g = gw.out_features, gw.group_size
    cfg = lookup(x2.device, x2.dtype, m, n, k, g)
    if cfg is not None:
        return cfg
    if interpreted() or x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing() \
            or os.environ.get("DBLLM_TRITON_TUNE", "1") == "0":
        return default_config(m, n, k, g, sm_count(x2.device))
    with _lock:
        t0 = time.perf_counter()
        cfg, results = tune(x2, gw, bias)
        _log(f"tuned {cache_key(x2.dtype, n, k, g, m)} in {time.perf_counter() - t0:.1f} s: {cfg.short()} "
             f"({results[cfg.short()] * 1e3:.1f} us)")
        _store(x2.device, cache_key(x2.dtype, n, k, g, m), cfg)
    return cfg


def choose_traced(device: torch.device, dtype: torch.dtype, m: Any, n: int, k: int, g: int,
                  has_bias: bool) -> KernelConfig:
    """The configuration for a traced call (``torch.compile``, export): the cached choice, else
    tune now on synthetic CUDA inputs of the traced shapes (random codes and scales: the kernels'
    speed does not depend on the values), else the default. ``m`` must be a concrete int to tune
    (a symbolic batch, e.g. an export with a dynamic batch, gets the decode default, M <= 16,
    without split-K: the batch may be large at run time and the workspace grows with it)."""
    if not isinstance(m, int):
        return dataclasses.replace(default_config(16, n, k, g, sm_count(device)), split_k=1)
    cfg = lookup(device, dtype, m, n, k, g)
    if cfg is not None or device.type != "cuda" or interpreted() or not torch.cuda.is_available() \
            or os.environ.get("DBLLM_TRITON_TUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return cfg or default_config(m, n, k, g, sm_count(device))
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():  # real tensors while the caller traces
        k_alloc = -(-padded_in_features(k, g) // K_ALIGN) * K_ALIGN
        gen = torch.Generator(device=device).manual_seed(0)
        qweight = torch.randint(-2**31, 2**31 - 1, (n, k_alloc // 16), dtype=torch.int32, device=device, generator=gen)
        scales = (torch.rand(n, k_alloc // g, 2, device=device, generator=gen) * 0.02).to(dtype)
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        bias = torch.zeros(n, device=device, dtype=dtype) if has_bias else None
        return choose(x, GpuWeights(qweight, scales, k, g), bias)


def _log(msg: str) -> None:
    if os.environ.get("DBLLM_TRITON_VERBOSE", "0") != "0":
        print(f"[dbllm triton] {msg}", flush=True)
