"""Programmatic dependent launch (PDL) for the batch-1 gemv: a decode layer's kernel chain, with and without.

A Llama-2-7B decoder layer at batch 1 without attention, as a chain of kernels inside one CUDA
graph over a stack of layers larger than L2:

    rmsnorm -> gemv 12,288 x 4,096 (q/k/v) -> take 4,096 -> gemv 4,096 x 4,096 (o) -> add
    -> rmsnorm -> gemv 22,016 x 4,096 (gate/up) -> silu * up -> gemv 4,096 x 11,008 (down) -> add

The small kernels are Triton kernels here (Inductor's in the real model). Variants, same
process, same weights, same tuned gemv configs:

- ``off``: no PDL;
- ``gemv``: the gemvs launched with PDL (``DBLLM_GEMV_PDL=1``: their first weight tile is
  requested before ``griddepcontrol.wait``), the small kernels without;
- ``small``: the small kernels with PDL, the gemvs without;
- ``all``: the small kernels launched with PDL too (``gdc_wait`` before their first load,
  ``gdc_launch_dependents`` after it), as ``TORCHINDUCTOR_ENABLE_PDL=1`` makes Inductor do.

Checks that every variant gives the same output as ``off`` (bit for bit). Writes JSON.

    python3 benchmarks/bench_pdl.py --out pdl.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_ms, machine_info, random_gpu_weights  # noqa: E402


@triton.jit
def _rms_kernel(h_ptr, w_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.rsqrt(tl.sum(h * h, axis=0) / N + 1e-6)
    tl.store(out_ptr + offs, (h * r * w).to(tl.float16), mask=ok)


@triton.jit
def _add_kernel(h_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """h += y[:N] (also the stand-in for attention: y is the q/k/v output, its first N values)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(h_ptr + offs, (h + y * 0.01).to(tl.float16), mask=ok)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(gu_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + N + offs, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(tl.float16), mask=ok)


def _small(kernel, grid, *args, block, pdl):
    kw = {"launch_pdl": True} if pdl else {}
    kernel[grid](*args, BLOCK=block, PDL=pdl, num_warps=4, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("pdl.json"))
    ap.add_argument("--layers", type=int, default=8, help="layers in the graph (8: about 500 MB of 2-bit weights)")
    args = ap.parse_args()
    import dbllm_compile.backends  # noqa: F401
    from dbllm_compile.backends.triton import launch
    from dbllm_compile.backends.triton.tuning import choose

    hidden, inter = 4096, 11008
    shapes = {"qkv": (3 * hidden, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    layers = [{name: random_gpu_weights(n, k, torch.float16) for name, (n, k) in shapes.items()}
              for _ in range(args.layers)]
    h0 = torch.randn(1, hidden, device="cuda", dtype=torch.float16)
    norm_w = torch.ones(hidden, device="cuda", dtype=torch.float16)
    cfgs = {}
    for name, (n, k) in shapes.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        cfgs[name] = choose(x, layers[0][name], None)
    print("configs:", {k: v.short() for k, v in cfgs.items()}, flush=True)
    h = h0.clone()
    xn = torch.empty(1, hidden, device="cuda", dtype=torch.float16)
    act = torch.empty(1, inter, device="cuda", dtype=torch.float16)

    def chain(pdl_small: bool) -> None:
        for lw in layers:
            _small(_rms_kernel, (1,), h, norm_w, xn, hidden, block=hidden, pdl=pdl_small)
            qkv = launch.run_config(xn, lw["qkv"], None, cfgs["qkv"])
            _small(_add_kernel, (triton.cdiv(hidden, 1024),), xn, qkv, hidden, block=1024, pdl=pdl_small)
            o = launch.run_config(xn, lw["o"], None, cfgs["o"])
            _small(_add_kernel, (triton.cdiv(hidden, 1024),), h, o, hidden, block=1024, pdl=pdl_small)
            _small(_rms_kernel, (1,), h, norm_w, xn, hidden, block=hidden, pdl=pdl_small)
            gu = launch.run_config(xn, lw["gate_up"], None, cfgs["gate_up"])
            _small(_silu_mul_kernel, (triton.cdiv(inter, 1024),), gu, act, inter, block=1024, pdl=pdl_small)
            d = launch.run_config(act, lw["down"], None, cfgs["down"])
            _small(_add_kernel, (triton.cdiv(hidden, 1024),), h, d, hidden, block=1024, pdl=pdl_small)

    result = {"date": time.strftime("%Y-%m-%d"), **machine_info(), "layers": args.layers,
              "configs": {k: v.short() for k, v in cfgs.items()}, "us_per_layer": {}, "identical_to_off": {}}
    ref = None
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())

    for name, gemv_pdl, small_pdl in [("off", "0", False), ("gemv", "1", False), ("small", "0", True),
                                      ("all", "1", True), ("off_again", "0", False)]:
        os.environ["DBLLM_GEMV_PDL"] = gemv_pdl
        h.copy_(h0)
        chain(small_pdl)  # compile / warm up outside the graph
        h.copy_(h0)
        chain(small_pdl)
        torch.cuda.synchronize()
        out = h.clone()
        if ref is None:
            ref = out
        result["identical_to_off"][name] = same(out, ref)
        result.setdefault("nan_count", {})[name] = int(out.isnan().sum())
        ms = graph_ms(lambda small_pdl=small_pdl: (h.copy_(h0), chain(small_pdl)))
        result["us_per_layer"][name] = ms * 1e3 / args.layers
        torch.cuda.synchronize()
        result["identical_to_off"][name] &= same(h, ref)  # after the graph's replays too
        print(f"{name:10s} {result['us_per_layer'][name]:7.2f} us per layer  identical={result['identical_to_off'][name]}",
              flush=True)
    os.environ.pop("DBLLM_GEMV_PDL", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
