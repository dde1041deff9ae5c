"""Batch 1: the chunk gemv's variants against the word gemv's tuner candidates and cuBLAS fp16.

    python3 benchmarks/sweep_gemv_chunk.py --out DIR [--shapes 28672x8192,...] [--quick]

Per shape, in one process: the copy bandwidth, cuBLAS fp16, every word-gemv candidate of the
tuner (``tuning._GEMV`` x splits) and every chunk-gemv variant (block sizes x warps x splits x
``SUM16`` x ``PREFETCH_X``), each timed as ``bench_kernels.py`` times the tuned choice: CUDA-graph
replay over a stack of distinct layers holding 3x L2 (cold), median of 20, per layer. Every
variant's output is checked against the float32 product of the decoded weights (rel err and
max error in ulps of max|y|). Writes ``DIR/sweep_gemv_chunk.json`` after each shape.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbllm_compile.backends  # noqa: F401,E402
from benchmarks.bench_kernels import copy_bandwidth, graph_ms, machine_info, n_layers, random_gpu_weights  # noqa: E402
from dbllm_compile.backends.triton import tuning  # noqa: E402
from dbllm_compile.backends.triton.launch import KernelConfig, launch_gemv, run_config  # noqa: E402
from dbllm_compile.backends.triton.layout import dequantize_gpu_layout  # noqa: E402
from dbllm_compile.backends.triton.splitk import split_plan  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--shapes", default="28672x8192,8192x8192,4096x4096,11008x4096,4096x11008,12288x4096,22016x4096")
ap.add_argument("--bn", default="4,8,16")
ap.add_argument("--bk", default="1024,2048")
ap.add_argument("--warps", default="1,2")
ap.add_argument("--splits", default="1,2,4")
ap.add_argument("--sum16", default="1,4")
ap.add_argument("--prefetch-x", default="1,0")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
info = machine_info()
info["copy_GBps"] = copy_bandwidth() / 1e9
print(info, flush=True)
ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
res = {"info": info, "shapes": []}
for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    t_shape = time.time()
    q_bytes = n * k / 4 + n * (k // 64) * 4
    lq = n_layers(q_bytes, info["l2_bytes"])
    layers = [random_gpu_weights(n, k, torch.float16) for _ in range(lq)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.float(), dequantize_gpu_layout(layers[0]).float())
    scale = ref.abs().max().item()
    row = {"N": n, "K": k, "layers": lq, "q_bytes": q_bytes, "word": {}, "chunk": {}}

    def measure(fn):
        y = fn(layers[0]).float()
        torch.cuda.synchronize()
        err = ((y - ref).norm() / ref.norm()).item()
        ulps = ((y - ref).abs().max().item() / scale) / 2**-10
        us = graph_ms(lambda: [fn(gw) for gw in layers]) * 1e3 / lq
        return [round(us, 2), err, round(ulps, 2)]

    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
             for _ in range(min(n_layers(2 * n * k, info["l2_bytes"]),
                                max(2, int(0.3 * torch.cuda.mem_get_info()[0] // (2 * n * k)))))]
    row["cublas_us"] = graph_ms(lambda: [F.linear(x, w) for w in dense]) * 1e3 / len(dense)
    del dense
    torch.cuda.empty_cache()
    for c in tuning.candidates(1, n, k, 64, dtype=torch.float16):
        if c.kind != "gemv":
            continue
        try:
            row["word"][c.short()] = measure(lambda gw, c=c: run_config(x, gw, None, c))
        except Exception as e:  # noqa: BLE001
            row["word"][c.short()] = str(e)[:120]
    for bn, bk, w, sk, s16, pf in itertools.product(ints(args.bn), ints(args.bk), ints(args.warps), ints(args.splits),
                                                    ints(args.sum16), ints(args.prefetch_x)):
        if sk > 1 and split_plan(k, bk, sk)[1] != sk:
            continue
        c = KernelConfig(kind="gemvc", block_n=bn, block_k=bk, num_warps=w, num_stages=3, split_k=sk)
        name = f"{c.short()}-s{s16}{'' if pf else '-nopf'}"
        var = {"sum16": s16, "prefetch_x": bool(pf)}
        try:
            row["chunk"][name] = measure(lambda gw, c=c, var=var: launch_gemv(x, gw, None, c, variant=var))
        except Exception as e:  # noqa: BLE001
            row["chunk"][name] = str(e)[:120]
    ok = lambda d: {a: v[0] for a, v in d.items() if isinstance(v, list)}  # noqa: E731
    wbest = min(ok(row["word"]).items(), key=lambda kv: kv[1])
    cbest = min(ok(row["chunk"]).items(), key=lambda kv: kv[1])
    row["word_best"], row["chunk_best"] = wbest, cbest
    bw = lambda us: (q_bytes + 2 * (n + k)) / (us * 1e-6) / 1e9  # noqa: E731
    print(f"{n}x{k}: cuBLAS {row['cublas_us']:.1f} us | word best {wbest[0]} {wbest[1]:.1f} us "
          f"(x{row['cublas_us'] / wbest[1]:.2f}, {100 * bw(wbest[1]) / info['copy_GBps']:.0f}% copy) | chunk best "
          f"{cbest[0]} {cbest[1]:.1f} us (x{row['cublas_us'] / cbest[1]:.2f}, {100 * bw(cbest[1]) / info['copy_GBps']:.0f}%"
          f" copy) | {time.time() - t_shape:.0f} s", flush=True)
    top = sorted(ok(row["chunk"]).items(), key=lambda kv: kv[1])[:8]
    print("   chunk top: " + ", ".join(f"{a} {t:.1f} (err {row['chunk'][a][1]:.1e}, {row['chunk'][a][2]:.1f} ulp)"
                                      for a, t in top), flush=True)
    res["shapes"].append(row)
    (args.out / "sweep_gemv_chunk.json").write_text(json.dumps(res, indent=1))
    del layers
    torch.cuda.empty_cache()
info["copy_GBps_end"] = copy_bandwidth() / 1e9
(args.out / "sweep_gemv_chunk.json").write_text(json.dumps(res, indent=1))
print(f"copy {info['copy_GBps']:.0f} -> {info['copy_GBps_end']:.0f} GB/s", flush=True)
