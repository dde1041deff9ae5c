"""Where the A16 large-M path (dequantize, then cuBLAS) loses time against cuBLAS fp16, and
whether a second CUDA stream hides the decode. One run, same stacks, CUDA graphs, cold L2.

Per shape (M = 4096 by default), per layer of a stack holding at least 3x L2:

- ``cublas_random``: ``F.linear`` on the stack of random dense fp16 weights (bench_kernels' baseline);
- ``cublas_decoded``: ``F.linear`` on the dense weights our decode produces (stored beforehand):
  does cuBLAS run slower on these values (power, clocks)?
- ``dequant``: the dequant kernel alone; ``dequant_then_cublas``: the current path;
- ``dequant_other_then_cublas_decoded``: decode layer i into a scratch buffer, then cuBLAS on
  the stored decode of layer i: the current path's work without the freshly written operand;
- ``overlap_layers``: the decode of layer i+1 on a second stream while cuBLAS runs layer i
  (double buffer) -- what a backend that decodes one layer ahead would get;
- ``overlap_chunks{c}``: inside one op, N cut into ``c`` chunks; the decode of chunk j+1 on a
  second stream while cuBLAS runs chunk j.

Usage: ``python benchmarks/dequant_gap.py --out $OUT [--m 4096] [--shapes 4096x4096,...]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import G, copy_bandwidth, graph_ms, machine_info, n_layers, random_gpu_weights  # noqa: E402


def dequant_into(gw, w: torch.Tensor, row0: int = 0, rows: int | None = None) -> None:
    """Decode rows ``[row0, row0 + rows)`` of ``gw`` into ``w`` (dense ``[rows, K]`` view), with the
    dequant path's default block shape (:func:`~dbllm_compile.backends.triton.launch.launch_dequant`)."""
    from dbllm_compile.backends.triton.launch import launch_dequant
    from dbllm_compile.backends.triton.layout import GpuWeights

    rows = gw.out_features - row0 if rows is None else rows
    part = GpuWeights(gw.qweight[row0:row0 + rows], gw.scales[row0:row0 + rows], gw.in_features, gw.group_size)
    launch_dequant(part, w.dtype, out=w)


def case(n: int, k: int, m: int, l2: int, chunks: list[int]) -> dict:
    dtype = torch.float16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    q_bytes = n * k / 4 + n * (k // G) * 4
    lq = n_layers(q_bytes, l2)
    layers = [random_gpu_weights(n, k, dtype) for _ in range(lq)]
    lf = n_layers(2 * n * k, l2)
    lf = min(lf, max(2, int(0.3 * torch.cuda.mem_get_info()[0] // (2 * n * k))))
    r: dict = {"N": n, "K": k, "M": m, "layers_packed": lq, "layers_dense": lf}
    t = {}
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(lf)]
    t["cublas_random"] = graph_ms(lambda: [F.linear(x, w) for w in dense]) * 1e3 / lf
    del dense
    decoded = []
    for gw in layers[:lf]:
        w = torch.empty(n, k, device="cuda", dtype=dtype)
        dequant_into(gw, w)
        decoded.append(w)
    t["cublas_decoded"] = graph_ms(lambda: [F.linear(x, w) for w in decoded]) * 1e3 / len(decoded)
    bufs = [torch.empty(n, k, device="cuda", dtype=dtype) for _ in range(2)]
    t["dequant"] = graph_ms(lambda: [dequant_into(gw, bufs[0]) for gw in layers]) * 1e3 / lq
    t["dequant_then_cublas"] = graph_ms(
        lambda: [F.linear(x, (dequant_into(gw, bufs[0]), bufs[0])[1]) for gw in layers]) * 1e3 / lq
    t["dequant_other_then_cublas_decoded"] = graph_ms(
        lambda: [(dequant_into(layers[i], bufs[0]), F.linear(x, decoded[i])) for i in range(len(decoded))]) * 1e3 / len(decoded)
    side = torch.cuda.Stream()

    def overlap_layers():
        main = torch.cuda.current_stream()
        dequant_into(layers[0], bufs[0])
        for i in range(lq):
            if i + 1 < lq:
                side.wait_stream(main)  # buffer (i+1)%2 was last read by the GEMM of layer i-1
                with torch.cuda.stream(side):
                    dequant_into(layers[i + 1], bufs[(i + 1) % 2])
            F.linear(x, bufs[i % 2])
            main.wait_stream(side)

    t["overlap_layers"] = graph_ms(overlap_layers) * 1e3 / lq
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    for c in chunks:
        step = -(-n // c) // 256 * 256 or 256
        bounds = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]

        def overlap_chunks(bounds=bounds):
            main = torch.cuda.current_stream()
            for gw in layers:
                r0, r1 = bounds[0]
                dequant_into(gw, bufs[0][r0:r1], r0, r1 - r0)
                for j, (r0, r1) in enumerate(bounds):
                    if j + 1 < len(bounds):
                        side.wait_stream(main)
                        with torch.cuda.stream(side):
                            s0, s1 = bounds[j + 1]
                            dequant_into(gw, bufs[0][s0:s1], s0, s1 - s0)
                    torch.mm(x, bufs[0][r0:r1].t(), out=out[:, r0:r1])
                    main.wait_stream(side)

        t[f"overlap_chunks{len(bounds)}"] = graph_ms(overlap_chunks) * 1e3 / lq
    r["us"] = {kk: round(v, 2) for kk, v in t.items()}
    r["ratio_to_cublas"] = {kk: round(t["cublas_random"] / v, 3) for kk, v in t.items()}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,8192x8192,28672x8192")
    ap.add_argument("--chunks", default="2,4")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["copy_GBps"] = copy_bandwidth() / 1e9
    print(info, flush=True)
    res = []
    for s in a.shapes.split(","):
        n, k = (int(v) for v in s.split("x"))
        r = case(n, k, a.m, info["l2_bytes"], [int(c) for c in a.chunks.split(",")])
        res.append(r)
        print(f"{n}x{k} M={a.m}: " + "  ".join(f"{kk} {v:.1f} ({r['ratio_to_cublas'][kk]:.3f}x)"
                                            for kk, v in r["us"].items()), flush=True)
        torch.cuda.empty_cache()
    (a.out / "dequant_gap.json").write_text(json.dumps({"machine": info, "results": res}, indent=1))


if __name__ == "__main__":
    main()
