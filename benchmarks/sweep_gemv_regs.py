"""Chunk gemv at batch 1 under register caps (``maxnreg``), against the word gemv's best, per layer on a stack.

    python3 benchmarks/sweep_gemv_regs.py --out DIR [--shapes 28672x8192,8192x8192] [--caps 0,128,96,80]

Same timing as ``sweep_gemv_chunk.py`` (CUDA graph over a stack of layers holding 3x L2).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbllm_compile.backends  # noqa: F401,E402
from benchmarks.bench_kernels import graph_ms, machine_info, n_layers, random_gpu_weights  # noqa: E402
from dbllm_compile.backends.triton.launch import KernelConfig, launch_gemv  # noqa: E402
from dbllm_compile.backends.triton.layout import dequantize_gpu_layout  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--shapes", default="28672x8192,8192x8192,4096x4096")
ap.add_argument("--configs", default="gemvc8x2048w1s3,gemvc16x2048w2s3,gemvc4x2048w1s3,gemvc8x2048w1s3sk4,"
                "gemvc16x2048w1s3,gemvc32x2048w2s3,gemv4x1024w2s3,gemv8x1024w4s3")
ap.add_argument("--caps", default="0,128,96,80")
ap.add_argument("--sum16", default="1,4")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
info = machine_info()
res = {"info": info, "rows": []}
for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    lq = n_layers(n * k / 4 + n * k // 16, info["l2_bytes"])
    layers = [random_gpu_weights(n, k, torch.float16) for _ in range(lq)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.float(), dequantize_gpu_layout(layers[0]).float())
    out = {}
    for name, cap, s16 in itertools.product(args.configs.split(","), map(int, args.caps.split(",")),
                                            map(int, args.sum16.split(","))):
        c = KernelConfig.parse(name)
        if c.kind == "gemv" and (cap or s16 != 1):
            continue
        var = {"maxnreg": cap or None, "sum16": s16} if c.kind == "gemvc" else None
        tag = f"{name}-r{cap}-s{s16}"
        try:
            y = launch_gemv(x, layers[0], None, c, variant=var).float()
            err = ((y - ref).norm() / ref.norm()).item()
            us = graph_ms(lambda: [launch_gemv(x, gw, None, c, variant=var) for gw in layers]) * 1e3 / lq
            out[tag] = [round(us, 2), err]
        except Exception as e:  # noqa: BLE001
            out[tag] = str(e)[:100]
    ok = {a: v[0] for a, v in out.items() if isinstance(v, list)}
    print(f"{n}x{k}: " + ", ".join(f"{a} {t:.1f}" for a, t in sorted(ok.items(), key=lambda kv: kv[1])[:10]), flush=True)
    res["rows"].append({"N": n, "K": k, "times": out})
    (args.out / "sweep_gemv_regs.json").write_text(json.dumps(res, indent=1))
    del layers
    torch.cuda.empty_cache()
