"""Benchmark: dual-binary Triton kernels vs cuBLAS fp16 (and gemlite when importable), one run.

Every time is a CUDA-graph replay over a stack of distinct layers whose weights together exceed
three times the L2 cache (cold L2), divided by the number of layers. Reported per shape and M:
time, speed-up over cuBLAS fp16 measured in the same run, achieved bandwidth (bytes of packed
weights + scales + activations + output, over the time) and its share of the device-to-device
copy bandwidth measured at the start (bytes read + written). The first-call cost (tuning, which
compiles every candidate) is reported per case; ``--second-process`` times a fresh process that
finds the tuning cache on disk.

Usage::

    python benchmarks/bench_kernels.py --out $OUT                 # full table, JSON, PNG
    python benchmarks/bench_kernels.py --shapes 4096x4096 --m 1,16 --out /tmp/b
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
MS = [1, 16, 256, 4096]
G = 64


def machine_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "l2_bytes": p.L2_cache_size,
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def graph_ms(fn, reps: int = 20) -> float:
    """Median time of one replay of a CUDA graph of ``fn`` (already warmed up eagerly)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB buffer, after a warm-up)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(20):
        dst.copy_(src)
    ms = graph_ms(lambda: dst.copy_(src), reps=30)
    del src, dst
    return 2 * 2**30 / (ms * 1e-3)


def random_gpu_weights(n: int, k: int, dtype: torch.dtype):
    """Random weights directly in the GPU layout (kernel speed does not depend on the values)."""
    from dbllm_compile.backends.triton.layout import K_ALIGN, GpuWeights

    k_alloc = -(-k // K_ALIGN) * K_ALIGN
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k_alloc // 16), dtype=torch.int32, device="cuda")
    scales = (torch.rand(n, k_alloc // G, 2, device="cuda") * 0.02).to(dtype)
    return GpuWeights(qweight, scales, k, G)


def n_layers(bytes_per_layer: float, l2: int) -> int:
    return max(2, min(256, math.ceil(3 * l2 / bytes_per_layer)))


A4_CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4)]  # block_m, block_n, warps, stages
A4_ROW_CONFIGS_SMALL_M = [(16, 64, 256, 4, 3), (16, 128, 256, 4, 4), (32, 64, 256, 4, 3), (64, 64, 128, 4, 3)]
A4_ROW_CONFIGS = [(128, 128, 128, 8, 3), (128, 128, 256, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                  (128, 128, 64, 8, 4), (64, 128, 256, 4, 4), (128, 64, 256, 4, 4)]
"""levels='row' fused kernel: block_m, block_n, block_k, warps, stages (untuned starting points)."""


def _time_candidates(name: str, make_fn, configs: dict, lq: int) -> dict:
    """Graph time per layer (us) of ``make_fn(*config)`` for every named config; NaN if it fails."""
    times = {}
    for cname, cfg in configs.items():
        try:
            fn = make_fn(*cfg)
            fn()
            times[cname] = graph_ms(fn) * 1e3 / lq
        except Exception as e:  # a config that does not compile here
            times[cname] = float("nan")
            print(f"  {name} {cname}: {type(e).__name__}: {str(e)[:160]}", flush=True)
    return times


def _record(r: dict, name: str, times: dict) -> str | None:
    ok = {c: t for c, t in times.items() if not math.isnan(t)}
    if not ok:
        return None
    best = min(ok, key=ok.get)
    r[f"{name}_us"], r[f"{name}_config"], r[f"{name}_candidates_us"] = ok[best], best, times
    return best


def bench_a4(r: dict, x: torch.Tensor, layers: list, lq: int) -> None:
    """4-bit activations (act-quant kernel + int8 GEMM, every level mode), best of a few untuned
    block configurations, over the same stack of layers; error vs the float64 formula of the mode
    on the first 16 rows. Keys ``a4_exact_*`` (levels='exact'), ``a4_int_levels_*`` ('group'),
    ``a4_row_*`` ('row', fused kernel), ``a4_row_dense_*`` ('row' as decode to int8 +
    ``torch._int_mm`` + scale, M > 16), ``a4_row_int_mm_only_us`` (``torch._int_mm`` alone on
    pre-decoded int8 weights: the floor of the dense form, not a deployable path at 8 bits/weight)."""
    from dbllm_compile.backends.triton import a4
    from dbllm_compile.backends.triton.a4_dense import a4_row_dense_matmul, decode_row_int8

    ratio = torch.tensor(0.9, device=x.device)
    k_alloc = layers[0].qweight.shape[1] * 16
    q, s = a4.act_quant_int8(x, ratio, k_alloc)
    rows = min(x.shape[0], 16)  # the float64 reference holds [M, N, groups]: check the first rows

    def check(name, y, levels):
        ref = a4.a4_linear_reference(q[:rows], s[:rows], layers[0], None, levels=levels)
        r[f"{name}_rel_err"] = float((y.double()[:rows] - ref).norm() / ref.norm())

    for levels in ("exact", "group"):
        name = "a4_int_levels" if levels == "group" else "a4_exact"
        configs = {f"m{bm}n{bn}w{w}s{st}": (bm, bn, w, st) for bm, bn, w, st in A4_CONFIGS}
        times = _time_candidates(name, lambda bm, bn, w, st: lambda: [a4.a4_linear(
            x, ratio, gw, None, levels=levels, block_m=bm, block_n=bn, num_warps=w, num_stages=st) for gw in layers],
            configs, lq)
        best = _record(r, name, times)
        if best:
            bm, bn, w, st = configs[best]
            check(name, a4.a4_linear(x, ratio, layers[0], None, levels=levels, block_m=bm, block_n=bn,
                                     num_warps=w, num_stages=st), levels)

    rls = [a4.prepare_row_levels(gw) for gw in layers]  # once per layer, as a weight cache would
    m = x.shape[0]
    configs = {f"m{bm}n{bn}k{bk}w{w}s{st}": (bm, bn, bk, w, st)
               for bm, bn, bk, w, st in (A4_ROW_CONFIGS_SMALL_M if m <= 64 else A4_ROW_CONFIGS)}
    times = _time_candidates("a4_row", lambda bm, bn, bk, w, st: lambda: [a4.a4_linear(
        x, ratio, gw, None, levels="row", row_levels=rl, block_m=bm, block_n=bn, block_k=bk, num_warps=w,
        num_stages=st) for gw, rl in zip(layers, rls)], configs, lq)
    best = _record(r, "a4_row", times)
    if best:
        bm, bn, bk, w, st = configs[best]
        check("a4_row", a4.a4_linear(x, ratio, layers[0], None, levels="row", row_levels=rls[0], block_m=bm,
                                     block_n=bn, block_k=bk, num_warps=w, num_stages=st), "row")
    if m > 16:
        def dense(gw, rl):
            qq, ss = a4.act_quant_int8(x, ratio, gw.qweight.shape[1] * 16)
            return a4_row_dense_matmul(qq, ss, gw, None, x.dtype, row_levels=rl)

        if _record(r, "a4_row_dense", _time_candidates(
                "a4_row_dense", lambda: lambda: [dense(gw, rl) for gw, rl in zip(layers, rls)], {"default": ()}, lq)):
            check("a4_row_dense", dense(layers[0], rls[0]), "row")
        try:
            w_ints = [decode_row_int8(gw, rl, k_alloc) for gw, rl in zip(layers, rls)]
            r["a4_row_int_mm_only_us"] = graph_ms(lambda: [torch._int_mm(q, w.t()) for w in w_ints]) * 1e3 / lq
            del w_ints
        except Exception as e:  # out of memory at 8 bits per weight, or a cuBLAS shape limit
            print(f"  a4_row_int_mm_only: {type(e).__name__}: {str(e)[:160]}", flush=True)


DEQUANT_BLOCKS = [(32, 512, 4), (64, 256, 4), (16, 1024, 4)]
"""block_n, block_k, warps of the dequant kernel timed alone by ``--dequant-only``."""


def bench_dequant_only(r: dict, x: torch.Tensor, layers: list, lq: int, copy_bw: float) -> None:
    """The dequant kernel alone (dense write + codes and scales read, against the copy bandwidth)
    and dequant + cuBLAS, same stack: how much of the M >= 256 time the decode itself costs."""
    from dbllm_compile.backends.triton.launch import KernelConfig, launch_dequant

    n, k = layers[0].out_features, layers[0].in_features
    k_pad = -(-k // G) * G
    moved = n * k * x.element_size() + n * k_pad / 4 + n * (k_pad // G) * 2 * x.element_size()
    res: dict = {}
    for bn, bk, w in DEQUANT_BLOCKS:
        cfg = KernelConfig(kind="dequant", block_n=bn, block_k=bk, num_warps=w)
        try:
            fn = lambda: [launch_dequant(gw, x.dtype, cfg) for gw in layers]  # noqa: E731
            fn()
            us = graph_ms(fn) * 1e3 / lq
            with_cublas = graph_ms(lambda: [F.linear(x, launch_dequant(gw, x.dtype, cfg)) for gw in layers]) * 1e3 / lq
            res[cfg.short()] = {"dequant_us": us, "GBps": moved / (us * 1e-6) / 1e9,
                                "pct_copy": 100 * moved / (us * 1e-6) / copy_bw, "with_cublas_us": with_cublas}
            print(f"  {cfg.short()}: dequant alone {us:.1f} us ({res[cfg.short()]['pct_copy']:.0f}% copy), "
                  f"+ cuBLAS {with_cublas:.1f} us", flush=True)
        except Exception as e:  # a block shape that does not compile or fit
            res[cfg.short()] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    r["dequant_only"] = res


def bench_case(n: int, k: int, m: int, dtype: torch.dtype, l2: int, copy_bw: float, a4: bool = False,
               dequant_only: bool = False, gemlite: bool = False) -> dict:
    from dbllm_compile.backends.triton import tuning
    from dbllm_compile.backends.triton.dispatch import linear_prepared
    from dbllm_compile.backends.triton.launch import run_config

    k_pad = -(-k // G) * G
    q_bytes = n * k_pad / 4 + n * (k_pad // G) * 4  # codes + two 16-bit scales per group
    io_bytes = (m * k + m * n) * 2
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    r = {"N": n, "K": k, "M": m, "dtype": str(dtype)[6:]}

    # ours: tune (first-call cost: compiles and times every candidate), then a cold-L2 graph
    lq = n_layers(q_bytes, l2)
    layers = [random_gpu_weights(n, k, dtype) for _ in range(lq)]
    t0 = time.perf_counter()
    cfg, cand = tuning.tune(x, layers[0], None)
    r["first_call_s"] = round(time.perf_counter() - t0, 2)
    tuning._store(x.device, tuning.cache_key(dtype, n, k, G, m), cfg)
    r["config"] = cfg.short()
    # correctness of this very configuration against the torch decode of the same weights
    from dbllm_compile.backends.triton.layout import dequantize_gpu_layout

    y = linear_prepared(x, layers[0], None).float()
    ref = F.linear(x.float(), dequantize_gpu_layout(layers[0]).float())
    r["rel_err"] = ((y - ref).norm() / ref.norm()).item()
    del y, ref
    r["candidates_us"] = {name: round(ms * 1e3, 2) for name, ms in cand.items()}
    r["ours_us"] = graph_ms(lambda: [linear_prepared(x, gw, None) for gw in layers]) * 1e3 / lq
    if m > 16:  # the best fused-kernel config alone, to show what dequant+cuBLAS adds
        fused = [c for c in tuning.candidates(m, n, k, G) if c.kind == "fused"]
        timed = {c: cand[c.short()] for c in fused if not math.isnan(cand.get(c.short(), math.nan))}
        best = min(timed, key=timed.get)
        r["fused_config"] = best.short()
        r["fused_us"] = graph_ms(lambda: [run_config(x, gw, None, best) for gw in layers]) * 1e3 / lq
    if m <= 16 and cfg.split_k > 1:  # before/after split-K in the same run
        unsplit = [c for c in tuning.candidates(m, n, k, G) if c.kind == "fused" and c.split_k == 1]
        timed = {c: cand[c.short()] for c in unsplit if not math.isnan(cand.get(c.short(), math.nan))}
        if timed:
            best = min(timed, key=timed.get)
            r["unsplit_config"] = best.short()
            r["unsplit_us"] = graph_ms(lambda: [run_config(x, gw, None, best) for gw in layers]) * 1e3 / lq
    if m <= 16:  # the best configuration of each kernel kind (tensor-core fused, gemvs, mma), same stack
        kinds = (("fused", "tc"), ("gemv", "gemv"), ("gemvc", "gemvc")) if m == 1 else (("fused", "tc"), ("mma", "mma"))
        for kind, key in kinds:
            timed = {c: cand[c.short()] for c in tuning.candidates(m, n, k, G, dtype=dtype)
                     if c.kind == kind and not math.isnan(cand.get(c.short(), math.nan))}
            if timed:
                best = min(timed, key=timed.get)
                r[f"{key}_config"] = best.short()
                r[f"{key}_us"] = graph_ms(lambda: [run_config(x, gw, None, best) for gw in layers]) * 1e3 / lq
                y = run_config(x, layers[0], None, best).float()
                ref = F.linear(x.float(), dequantize_gpu_layout(layers[0]).float())
                r[f"{key}_rel_err"] = ((y - ref).norm() / ref.norm()).item()
    if a4 and m >= 16:
        bench_a4(r, x, layers, lq)
    if dequant_only and m > 16:
        bench_dequant_only(r, x, layers, lq, copy_bw)
    del layers
    r["layers_ours"] = lq

    # cuBLAS fp16 over its own stack of dense layers
    lf = n_layers(2 * n * k, l2)
    lf = min(lf, max(2, int(0.4 * torch.cuda.mem_get_info()[0] // (2 * n * k))))
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(lf)]
    r["cublas_us"] = graph_ms(lambda: [F.linear(x, w) for w in dense]) * 1e3 / lf
    r["layers_cublas"] = lf
    del dense
    torch.cuda.empty_cache()

    if gemlite:
        bench_gemlite(r, x, n, k, l2)
        if "gemlite_us" in r:
            r["vs_gemlite"] = r["gemlite_us"] / r["ours_us"]
    r["speedup"] = r["cublas_us"] / r["ours_us"]
    r["ours_GBps"] = (q_bytes + io_bytes) / (r["ours_us"] * 1e-6) / 1e9
    r["cublas_GBps"] = (2 * n * k + io_bytes) / (r["cublas_us"] * 1e-6) / 1e9
    r["ours_pct_copy"] = 100 * r["ours_GBps"] * 1e9 / copy_bw
    r["tflops_ours"] = 2 * m * n * k / (r["ours_us"] * 1e-6) / 1e12
    r["tflops_cublas"] = 2 * m * n * k / (r["cublas_us"] * 1e-6) / 1e12
    return r


def gemlite_status() -> str:
    try:
        import gemlite
    except Exception as e:  # ImportError, or a broken install
        return f"not importable ({type(e).__name__}: {str(e)[:80]}); not measured"
    return f"gemlite {getattr(gemlite, '__version__', '?')}: A16W2, group {G}, fp16 (its own autotune and config cache)"


def gemlite_layer(n: int, k: int, dtype: torch.dtype, seed: int, dense: bool = False):
    """A gemlite 2-bit linear (HQQ format ``W = (W_q - zeros) * scales``, group ``G``) with random
    codes and scales, and (``dense``) its float32 dense weight for the error check, else None."""
    from gemlite import DType, GemLiteLinear

    g = torch.Generator(device="cuda").manual_seed(seed)
    w_q = torch.randint(0, 4, (n, k), dtype=torch.uint8, device="cuda", generator=g)
    scales = (torch.rand(n, k // G, device="cuda", generator=g) * 0.02 + 0.005).to(dtype)
    zeros = torch.full((n, k // G), 1.5, device="cuda", dtype=dtype)
    dt = DType.FP16 if dtype == torch.float16 else DType.BF16
    layer = GemLiteLinear(2, group_size=G, in_features=k, out_features=n, input_dtype=dt, output_dtype=dt)
    ref = (w_q.float() - zeros.float().repeat_interleave(G, 1)) * scales.float().repeat_interleave(G, 1) if dense else None
    layer.pack(w_q, scales, zeros, None)
    return layer, ref


def bench_gemlite(r: dict, x: torch.Tensor, n: int, k: int, l2: int) -> None:
    """gemlite's 2-bit kernel on its own stack of layers (same cold-L2, CUDA-graph timing as ours):
    ``gemlite_us``, its first-call seconds (its autotune unless its config cache has the shape),
    its error against its own dense weight. Failures are recorded, not raised."""
    try:
        q_bytes = n * k / 4 + n * (k // G) * 4
        lq = n_layers(q_bytes, l2)
        layer0, dense0 = gemlite_layer(n, k, x.dtype, 0, dense=True)
        layers = [layer0] + [gemlite_layer(n, k, x.dtype, seed)[0] for seed in range(1, lq)]
        t0 = time.perf_counter()
        y = layers[0](x)
        torch.cuda.synchronize()
        r["gemlite_first_call_s"] = round(time.perf_counter() - t0, 2)
        ref = F.linear(x.float(), dense0)
        r["gemlite_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        for layer in layers[1:]:  # every layer warmed up before the capture
            layer(x)
        r["gemlite_us"] = graph_ms(lambda: [layer(x) for layer in layers]) * 1e3 / lq
        r["gemlite_layers"] = lq
        del layers, dense0, y, ref
    except Exception as e:  # an unsupported shape or a kernel that does not capture
        r["gemlite_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.empty_cache()


def second_process_cost(out: Path, n: int, k: int, m: int) -> dict:
    """Time the first call of a fresh process that finds the tuning cache on disk."""
    code = f"""
import time, torch
t0 = time.perf_counter()
import dbllm_compile, dbllm_compile.backends
from dbllm_compile.backends.triton.dispatch import linear_prepared
from benchmarks.bench_kernels import random_gpu_weights
gw = random_gpu_weights({n}, {k}, torch.float16); x = torch.randn({m}, {k}, device='cuda', dtype=torch.float16)
torch.cuda.synchronize(); t1 = time.perf_counter()
linear_prepared(x, gw, None); torch.cuda.synchronize(); t2 = time.perf_counter()
linear_prepared(x, gw, None); torch.cuda.synchronize(); t3 = time.perf_counter()
print(f"{{t1 - t0:.3f}} {{t2 - t1:.3f}} {{t3 - t2:.4f}}")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        imp, first, second = map(float, res.stdout.split()[-3:])
        return {"shape": f"{n}x{k}", "M": m, "import_s": imp, "first_call_s": first, "second_call_s": second}
    except ValueError:
        return {"error": (res.stdout + res.stderr)[-500:]}


def plot(results: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({r["M"] for r in results})
    shapes = sorted({(r["N"], r["K"]) for r in results}, key=lambda s: s[0] * s[1])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ms)
    for i, m in enumerate(ms):
        vals = [next((r["speedup"] for r in results if r["M"] == m and (r["N"], r["K"]) == s), 0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=f"M={m}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"{n}x{k}" for n, k in shapes])
    ax.set_ylabel("speed-up over cuBLAS fp16")
    ax.set_title(f"dual-binary W2 (G=64) Triton kernels, {info['gpu']}, {info['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--second-process", action="store_true")
    ap.add_argument("--a4", action="store_true", help="also time the 4-bit-activation kernels (M >= 16)")
    ap.add_argument("--dequant-only", action="store_true",
                    help="M > 16: also time the dequant kernel alone and dequant + cuBLAS, a few block shapes")
    args = ap.parse_args()
    import dbllm_compile.backends  # noqa: F401

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    info = machine_info()
    info["copy_GBps"] = copy_bandwidth() / 1e9
    info["gemlite"] = gemlite_status()
    print(f"{info['gpu']}  SMs={info['sms']}  L2={info['l2_bytes'] / 2**20:.0f} MiB  torch {info['torch']}  "
          f"triton {info['triton']}  copy {info['copy_GBps']:.0f} GB/s  gemlite: {info['gemlite']}", flush=True)
    use_gemlite = info["gemlite"].startswith("gemlite ")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    results = []
    for n, k in shapes:
        for m in map(int, args.m.split(",")):
            r = bench_case(n, k, m, dtype, info["l2_bytes"], info["copy_GBps"] * 1e9, a4=args.a4,
                           dequant_only=args.dequant_only, gemlite=use_gemlite)
            results.append(r)
            print(f"N={n:6d} K={k:6d} M={m:5d}  cuBLAS {r['cublas_us']:9.1f} us  ours {r['ours_us']:9.1f} us "
                  f"({r['config']})  x{r['speedup']:.2f}  {r['ours_GBps']:6.0f} GB/s ({r['ours_pct_copy']:.0f}% copy)"
                  f"  tune {r['first_call_s']:.1f} s  err {r['rel_err']:.1e}" + (f"  fused {r['fused_us']:.1f} us ({r['fused_config']})" if "fused_us" in r else "")
                  + (f"  unsplit {r['unsplit_us']:.1f} us ({r['unsplit_config']})" if "unsplit_us" in r else "")
                  + "".join(f"  {key} {r[key + '_us']:.1f} us ({r[key + '_config']})" for key in ("tc", "gemv", "gemvc", "mma")
                            if key + "_us" in r),
                  flush=True)
            if "gemlite_us" in r:
                print(f"    gemlite 2-bit: {r['gemlite_us']:.1f} us (first call {r['gemlite_first_call_s']:.1f} s, err "
                      f"{r['gemlite_rel_err']:.1e}): ours x{r['vs_gemlite']:.2f} faster, cuBLAS/gemlite "
                      f"x{r['cublas_us'] / r['gemlite_us']:.2f}", flush=True)
            elif "gemlite_error" in r:
                print(f"    gemlite 2-bit: {r['gemlite_error']}", flush=True)
            for name in ("a4_exact", "a4_int_levels", "a4_row", "a4_row_dense"):
                if f"{name}_us" in r:
                    print(f"    {name}: {r[f'{name}_us']:.1f} us ({r[f'{name}_config']}) x{r['cublas_us'] / r[f'{name}_us']:.2f} "
                          f"vs cuBLAS, err {r[f'{name}_rel_err']:.1e}", flush=True)
            if "a4_row_int_mm_only_us" in r:
                print(f"    torch._int_mm alone (pre-decoded int8 weights): {r['a4_row_int_mm_only_us']:.1f} us", flush=True)
            # partial results survive a timeout of the device call
            (out / "bench_kernels.partial.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    info["copy_GBps_end"] = copy_bandwidth() / 1e9
    doc = {"info": info, "results": results}
    if args.second_process and shapes:
        doc["second_process"] = second_process_cost(out, shapes[0][0], shapes[0][1], 1)
        print("fresh process with the tuning cache on disk:", doc["second_process"])
    (out / "bench_kernels.json").write_text(json.dumps(doc, indent=1))
    plot(results, info, out / "bench_kernels.png")
    print(f"copy bandwidth: {info['copy_GBps']:.0f} GB/s at the start, {info['copy_GBps_end']:.0f} GB/s at the end")
    print()
    print(f"| N x K | M | cuBLAS fp16 (us) | ours (us) | speed-up | ours GB/s | % of copy ({info['copy_GBps']:.0f} GB/s) | config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['N']} x {r['K']} | {r['M']} | {r['cublas_us']:.1f} | {r['ours_us']:.1f} | {r['speedup']:.2f}x | "
              f"{r['ours_GBps']:.0f} | {r['ours_pct_copy']:.0f}% | {r['config']} |")


if __name__ == "__main__":
    main()
