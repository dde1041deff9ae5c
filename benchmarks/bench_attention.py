"""Decode attention (one query token against a static KV cache): PyTorch SDPA vs ``dbllm::decode_attention``.

Times, in one process on one GPU, one layer's decode attention inside a CUDA graph that runs it
over a stack of layers (separate caches, more bytes than L2, so every layer reads its cache
from DRAM as in a real decode step):

- ``sdpa``: ``F.scaled_dot_product_attention`` with the static cache's bool mask, PyTorch's own
  backend choice (cuDNN on an H100 with torch 2.11), and each backend forced
  (``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``); ``sdpa_flash_nomask`` (FlashAttention
  takes no mask; shown for scale only, it attends to the whole cache);
- ``ours_l{BLOCK_L}_s{SPLITS}_w{WARPS}``: the Triton kernel (+ its combine kernel when
  ``SPLITS > 1``); ``s0`` = the default split heuristic;
- ``op``: ``torch.ops.dbllm.decode_attention`` with its defaults (what the model runs).

Every variant's output is checked against the float32 reference. Writes JSON (``--out``) and
prints a table (us per layer, GB/s of the cache read).

    python3 benchmarks/bench_attention.py --out attn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_ms, machine_info  # noqa: E402

SHAPES = {  # name: (B, H, Hkv, D)
    "llama2-7b": (1, 32, 32, 128),
    "llama3-8b": (1, 32, 8, 128),
    "smollm2-135m": (1, 9, 3, 64),
    "llama2-7b-b8": (8, 32, 32, 128),
}


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, mask, scale):
        g = q.shape[1] // k.shape[1]
        kw = {"enable_gqa": True} if g > 1 else {}
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            if backend == "FLASH_ATTENTION":
                return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
            if g > 1:  # the masked backends take GQA only as repeated heads
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
                kw = {}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("attention.json"))
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b,smollm2-135m", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--lengths", default="152,1024,4096", help="cache lengths L")
    ap.add_argument("--configs", default="16:0:4,32:0:4,64:0:4,32:1:4,32:0:2,32:0:8,16:0:2,32:-2:4",
                    help="BLOCK_L:SPLITS:WARPS of our kernel (SPLITS 0: the default heuristic, -2: twice it)")
    args = ap.parse_args()
    import dbllm_compile.backends  # noqa: F401
    from dbllm_compile.backends.triton.decode_attention import (
        _sms,
        decode_attention_reference,
        default_splits,
        launch_decode_attention,
    )

    info = machine_info()
    results = []
    sms = _sms(torch.device("cuda"))
    for shape in args.shapes.split(","):
        b, h, hkv, d = SHAPES[shape]
        for length in (int(x) for x in args.lengths.split(",")):
            layer_bytes = 2 * b * hkv * length * d * 2
            layers = max(4, int(3 * 50e6 / layer_bytes) + 1)
            g = torch.Generator(device="cuda").manual_seed(length)
            qs = [torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(layers)]
            ks = [torch.randn(b, hkv, length, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(layers)]
            vs = [torch.randn(b, hkv, length, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(layers)]
            pos = length - 8
            mask = (torch.arange(length, device="cuda") <= pos)[None, None, None, :].expand(b, 1, 1, length)
            scale = d ** -0.5
            ref = decode_attention_reference(qs[0], ks[0], vs[0], mask, scale)
            variants = {"sdpa": _sdpa(None), "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
                        "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"), "sdpa_math": _sdpa("MATH"),
                        "sdpa_flash_nomask": _sdpa("FLASH_ATTENTION"),
                        "op": lambda q, k, v, m, s: torch.ops.dbllm.decode_attention(q, k, v, m, s)}
            for cfg in args.configs.split(","):
                bl, sp, w = (int(x) for x in cfg.split(":"))
                auto = default_splits(b * h, length, bl, sms)
                splits = auto if sp == 0 else (2 * auto if sp == -2 else sp)
                variants[f"ours_l{bl}_s{splits}_w{w}" + ("(auto)" if sp == 0 else "")] = (
                    lambda q, k, v, m, s, bl=bl, splits=splits, w=w: launch_decode_attention(
                        q, k, v, m, s, block_l=bl, splits=splits, num_warps=w))
            row = {"shape": shape, "B": b, "H": h, "Hkv": hkv, "D": d, "L": length, "layers": layers,
                   "cache_bytes_per_layer": layer_bytes, "us": {}, "max_err": {}}
            for name, fn in variants.items():
                try:
                    y = fn(qs[0], ks[0], vs[0], mask, scale)
                    if y.shape != ref.shape:  # SDPA: [B, H, 1, D]
                        y = y.transpose(1, 2)
                    row["max_err"][name] = float((y.float() - ref.float()).abs().max())
                    ms = graph_ms(lambda fn=fn, qs=qs, ks=ks, vs=vs: [fn(q, k, v, mask, scale) for q, k, v in zip(qs, ks, vs)])
                    row["us"][name] = ms * 1e3 / layers
                except Exception as exc:  # a backend that refuses the case
                    row["us"][name] = None
                    row["max_err"][name] = f"{type(exc).__name__}: {str(exc)[:160]}"
            results.append(row)
            best = min((n for n in row["us"] if n.startswith("ours") and row["us"][n]), key=lambda n: row["us"][n])
            print(f"{shape:14s} L={length:5d}  sdpa {row['us']['sdpa']:.2f} us  op {row['us']['op']:.2f} us  "
                  f"best ours {row['us'][best]:.2f} us ({best})  "
                  f"({layer_bytes / row['us'][best] / 1e3:.0f} GB/s)", flush=True)
            for name, us in row["us"].items():
                err = row["max_err"][name]
                print(f"    {name:28s} {'-' if us is None else f'{us:.2f}'}  err "
                      f"{err if isinstance(err, str) else f'{err:.1e}'}")
            del qs, ks, vs
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
