"""Small batch (M = 2..16): the mma kernel's block shapes against the tuner's fused candidates and cuBLAS fp16.

    python3 benchmarks/sweep_mma16.py --out DIR [--shapes 28672x8192,...] [--m 16,8]

Per shape and M, in one process: cuBLAS fp16 (its own stack of dense layers), every fused-kernel
candidate the tuner has for that M (``tuning.candidates``, kind ``fused``) and every mma
configuration (rows per program x chunk x warps x splits), each timed as ``bench_kernels.py``
times the tuned choice: CUDA-graph replay over a stack of distinct layers holding 3x L2 (cold),
median of 20, per layer. Every configuration's output is checked against the float32 product of
the decoded weights (relative error). Writes ``DIR/sweep_mma16.json`` after each case.
"""
import argparse
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
from dbllm_compile.backends.triton.launch import KernelConfig, run_config  # noqa: E402
from dbllm_compile.backends.triton.layout import dequantize_gpu_layout  # noqa: E402
from dbllm_compile.backends.triton.mma16 import launch_mma16  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--shapes", default="28672x8192,8192x8192,4096x4096,11008x4096,4096x11008")
ap.add_argument("--m", default="16")
ap.add_argument("--rows", default="64,128,256", help="weight rows per program (16 * tiles * warps)")
ap.add_argument("--bk", default="128,256")
ap.add_argument("--warps", default="4,8")
ap.add_argument("--splits", default="1,2,4")
ap.add_argument("--prefetch-x", default="1,0")
ap.add_argument("--l2pf", default="0", help="L2 prefetch sizes of the code-word loads (bytes, 0 = none)")
ap.add_argument("--maxnreg", default="0", help="register caps per thread (0 = none)")
ap.add_argument("--strided", default="0,1", help="the kernel's STRIDED lane-word order (0, 1 or both)")
ap.add_argument("--no-fused", action="store_true", help="skip the fused candidates")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
info = machine_info()
info["copy_GBps"] = copy_bandwidth() / 1e9
print(info, flush=True)
ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
res = {"info": info, "cases": []}
for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    q_bytes = n * k / 4 + n * (k // 64) * 4
    lq = n_layers(q_bytes, info["l2_bytes"])
    layers = [random_gpu_weights(n, k, torch.float16) for _ in range(lq)]
    w_ref = dequantize_gpu_layout(layers[0]).float()
    lf = n_layers(2 * n * k, info["l2_bytes"])
    lf = min(lf, max(2, int(0.3 * torch.cuda.mem_get_info()[0] // (2 * n * k))))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(lf)]
    for m in ints(args.m):
        t0 = time.time()
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x.float(), w_ref)
        cublas = graph_ms(lambda: [F.linear(x, w) for w in dense]) * 1e3 / lf
        row = {"N": n, "K": k, "M": m, "layers": lq, "q_bytes": q_bytes, "cublas_us": cublas, "fused": {}, "mma": {}}

        def measure(cfg, **var):
            run = (lambda gw: launch_mma16(x, gw, None, cfg, **var)) if var else (lambda gw: run_config(x, gw, None, cfg))
            try:
                y = run(layers[0]).float()
                err = ((y - ref).norm() / ref.norm()).item()
                us = graph_ms(lambda: [run(gw) for gw in layers]) * 1e3 / lq
            except Exception as e:  # a configuration that does not compile or fit
                return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            gbps = (q_bytes + 2 * m * (k + n)) / (us * 1e-6) / 1e9
            last = getattr(launch_mma16, "last", None) if var else None
            regs = {"regs": getattr(last, "n_regs", None), "spills": getattr(last, "n_spills", None)} if last else {}
            return {**regs, "us": round(us, 2), "speedup": round(cublas / us, 3), "pct_copy": round(100 * gbps * 1e9 / info["copy_GBps"] / 1e9, 1),
                    "rel_err": err}

        if not args.no_fused:
            for cfg in tuning.candidates(m, n, k, 64, dtype=torch.float16):
                if cfg.kind == "fused":
                    row["fused"][cfg.short()] = measure(cfg)
        for rows in ints(args.rows):
            for bk in ints(args.bk):
                for w in ints(args.warps):
                    if rows % (16 * w):
                        continue
                    for sk in ints(args.splits):
                        cfg = KernelConfig(kind="mma", block_n=rows, block_k=bk, num_warps=w, split_k=sk)
                        for p in ints(args.prefetch_x):
                            for pf in ints(args.l2pf):
                                for mr in ints(args.maxnreg):
                                    for st in ints(args.strided):
                                        name = (cfg.short() + ("" if p else "-nopx") + (f"-pf{pf}" if pf else "")
                                                + (f"-r{mr}" if mr else "") + ("-str" if st else ""))
                                        row["mma"][name] = measure(cfg, prefetch_x=bool(p), l2pf=pf, maxnreg=mr or None,
                                                                   strided=bool(st))
        for kind in ("fused", "mma"):
            ok = {c: v for c, v in row[kind].items() if "us" in v}
            if ok:
                best = min(ok, key=lambda c: ok[c]["us"])
                row[f"best_{kind}"] = best
                print(f"{n}x{k} M={m}: cuBLAS {cublas:.1f} us; best {kind} {best} {ok[best]['us']:.1f} us "
                      f"{ok[best]['speedup']:.2f}x {ok[best]['pct_copy']:.0f}% copy err {ok[best]['rel_err']:.1e}", flush=True)
        for c, v in sorted(row["mma"].items(), key=lambda cv: cv[1].get("us", 1e9))[:12]:
            print(f"   {c}: {v.get('us')} us, {v.get('pct_copy')}% copy, regs {v.get('regs')} spills {v.get('spills')}",
                  flush=True)
        bad = {c: v for c, v in row["mma"].items() if "error" in v or v["rel_err"] > 2e-3}
        if bad:
            print(f"  mma failures/errors: {json.dumps(bad)[:1500]}", flush=True)
        row["sweep_s"] = round(time.time() - t0, 1)
        res["cases"].append(row)
        (args.out / "sweep_mma16.json").write_text(json.dumps(res, indent=1))
    del layers, dense
    torch.cuda.empty_cache()
