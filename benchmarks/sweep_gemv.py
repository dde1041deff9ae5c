"""Sweep gemv configurations (block sizes, warps, split-K) at M=1 against the tuned tensor-core kernel.

    python3 benchmarks/sweep_gemv.py --out DIR [--shapes 28672x8192,...]

Each configuration: one layer, cold L2 (256 MiB flush), CUDA-graph replay, median of 20
(``tuning._time_ms``). Writes ``DIR/sweep_gemv.json``.
"""
import argparse, itertools, json, os, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbllm_compile.backends  # noqa: F401,E402
from benchmarks.bench_kernels import random_gpu_weights  # noqa: E402
from dbllm_compile.backends.triton import tuning  # noqa: E402
from dbllm_compile.backends.triton.launch import KernelConfig, run_config  # noqa: E402
from dbllm_compile.backends.triton.splitk import split_plan  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--shapes", default="28672x8192,8192x8192,4096x4096,22016x4096,12288x4096,4096x11008")
ap.add_argument("--bn", default="16,32,64")
ap.add_argument("--bk", default="256,512")
ap.add_argument("--warps", default="1,2,4")
ap.add_argument("--splits", default="1,2,4,8")
ap.add_argument("--loads", default="2", help="DBLLM_GEMV_LOADS values to sweep (backends/triton/gemv.py: 0 tl.load, "
                "1 x in asm, 2 every load in asm); names of runs other than 2 end in '-L<value>'")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
res = []
for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    gw = random_gpu_weights(n, k, torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    row = {"N": n, "K": k, "gemv": {}}
    tc = [c for c in tuning.candidates(1, n, k, 64, dtype=torch.float16) if c.kind == "fused"]
    best_tc = None
    for c in tc:
        run_config(x, gw, None, c); torch.cuda.synchronize()
        t = tuning._time_ms(lambda: run_config(x, gw, None, c), flush, 20) * 1e3
        if best_tc is None or t < best_tc[1]:
            best_tc = (c.short(), t)
    row["tc_best"] = best_tc
    ref = run_config(x, gw, None, KernelConfig.parse(best_tc[0])).float()
    for xv, bn, bk, w, sk in itertools.product(*(map(int, a.split(",")) for a in (args.loads, args.bn, args.bk, args.warps, args.splits))):
        os.environ["DBLLM_GEMV_LOADS"] = str(xv)
        if bn * bk // 16 < 32 * w:  # fewer words than threads
            continue
        if sk > 1 and split_plan(k, bk, sk)[1] != sk:
            continue
        c = KernelConfig(kind="gemv", block_n=bn, block_k=bk, num_warps=w, num_stages=3, split_k=sk)
        try:
            y = run_config(x, gw, None, c).float(); torch.cuda.synchronize()
            err = ((y - ref).norm() / ref.norm()).item()
            t = tuning._time_ms(lambda: run_config(x, gw, None, c), flush, 20) * 1e3
        except Exception as e:
            row["gemv"][c.short() + ("" if xv == 2 else f"-L{xv}")] = str(e)[:100]
            continue
        row["gemv"][c.short() + ("" if xv == 2 else f"-L{xv}")] = [round(t, 2), err]
    ok = {kk: v[0] for kk, v in row["gemv"].items() if isinstance(v, list)}
    top = sorted(ok, key=ok.get)[:5]
    print(f"{n}x{k}: tc {best_tc[0]} {best_tc[1]:.1f} us; gemv best " + ", ".join(f"{t} {ok[t]:.1f}" for t in top), flush=True)
    res.append(row)
    (args.out / "sweep_gemv.json").write_text(json.dumps(res, indent=1))
