"""GPU benchmark of the torch.compile backend "dbllm" (one run, < 8 minutes on an H100).

Parts (``--parts``, default all):

- ``decode``: batch-1 generation of a Llama-2-7B-shaped random-weight fp16 model (cheap init:
  ``init="maxabs"``; random weights give the same speed as trained ones), 2-bit through
  ``backend="dbllm"`` vs fp16 through ``backend="inductor"``, both ``mode="reduce-overhead"``
  (CUDA graphs), static KV cache; decode and prefill tokens/s, peak memory.
- ``distill``: one end-to-end distillation step (forward + loss + backward + AdamW on scales
  and latent weights) of a SmolLM2-shaped random model, eager vs compiled with the backend.
- ``greedy`` (with ``--model``): the real SmolLM2 (GGUF file or HF directory), greedy tokens
  through the backend (static cache, compiled steps, CUDA graphs) vs the eager quantized model
  from ``quantize()`` + ``convert()``; with ``--artifact OUT``, both use the trained layers of a
  distilled artifact (mode (b) of docs/compile.md) instead of post-training quantization.

Writes ``<out>/compile_bench.json`` and ``<out>/compile_bench.png``.

    python benchmarks/gpu_compile_bench.py --out bench-out --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dbllm_compile.bench import decode_speed, distill_step_speed, greedy_match, llama_model


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "decode" in result:
        d = result["decode"]
        panels.append(("decode tokens/s (batch 1)", ["fp16 inductor", "2-bit dbllm"],
                       [d["baseline"]["decode_tokens_per_s"], d["dbllm"]["decode_tokens_per_s"]]))
        if d["baseline"].get("peak_memory_bytes"):
            panels.append(("peak memory (GB)", ["fp16 inductor", "2-bit dbllm"],
                           [d["baseline"]["peak_memory_bytes"] / 1e9, d["dbllm"]["peak_memory_bytes"] / 1e9]))
    if "distill" in result:
        d = result["distill"]
        panels.append(("distillation step (ms)", ["eager", "compiled", "compiled\nopaque op"],
                       [1e3 * d["eager"]["seconds_per_step"], 1e3 * d["compiled"]["seconds_per_step"],
                        1e3 * d["compiled_opaque_op"]["seconds_per_step"]]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (title, labels, values) in zip(axes, panels):
        bars = ax.bar(labels, values, color=["#888888", "#1f77b4", "#ff7f0e"][: len(values)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"torch.compile backend 'dbllm' — {result['device']} — {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--model", default=None, help="real SmolLM2 (GGUF file or HF directory) for the greedy check")
    ap.add_argument("--artifact", default=None,
                    help="greedy check with the trained layers of this artifact (an OUT dir of dbllm-compile quantize, "
                         "16-bit activations) instead of on-the-fly post-training quantization")
    ap.add_argument("--parts", default="decode,distill,greedy")
    ap.add_argument("--layers", type=int, default=None, help="override the 7B model's 32 layers (faster compile)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=8)
    ap.add_argument("--distill-seq-len", type=int, default=256)
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "seconds": {},
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    path = args.out / "compile_bench.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=2))
        _plot(result, args.out / "compile_bench.png")

    if "greedy" in parts and args.model:
        t0 = time.perf_counter()
        from dbllm_compile.models import load_model

        model, tok = load_model(args.model, dtype=torch.float16 if device == "cuda" else torch.float32, device=device)
        prompt = tok("The capital of France is", return_tensors="pt").input_ids
        result["greedy"] = greedy_match(model, prompt, new_tokens=args.greedy_tokens, init="mse", artifact=args.artifact)
        result["greedy"]["eager_text"] = tok.decode(result["greedy"]["eager_tokens"])
        result["greedy"]["compiled_text"] = tok.decode(result["greedy"]["compiled_tokens"])
        result["seconds"]["greedy"] = time.perf_counter() - t0
        g = result["greedy"]
        print(f"greedy: identical={g['identical']} first difference at {g['first_difference_at']}\n"
              f"  eager:    {g['eager_text']!r}\n  compiled: {g['compiled_text']!r}", flush=True)
        save()
    if "decode" in parts:
        t0 = time.perf_counter()
        model = llama_model("llama2-7b", device, torch.float16 if device == "cuda" else torch.float32, args.layers)
        result["decode"] = decode_speed(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                        options={"init": "maxabs"})
        result["decode"]["layers"] = model.config.num_hidden_layers
        del model
        torch.cuda.empty_cache() if device == "cuda" else None
        result["seconds"]["decode"] = time.perf_counter() - t0
        d = result["decode"]
        print(f"decode: fp16 {d['baseline']['decode_tokens_per_s']:.1f} tok/s, 2-bit {d['dbllm']['decode_tokens_per_s']:.1f} "
              f"tok/s ({d['decode_speedup']:.2f}x); prefill {d['prefill_speedup']:.2f}x; "
              f"peak {d['baseline']['peak_memory_bytes']} vs {d['dbllm']['peak_memory_bytes']} bytes", flush=True)
        save()
    if "distill" in parts:
        t0 = time.perf_counter()
        model = llama_model("smollm2-135m", device, torch.float32)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        partial: dict = {}

        def progress(name: str, r: dict) -> None:
            partial[name] = r
            result["distill_partial"] = partial
            print(f"distill {name}: {r['seconds_per_step'] * 1e3:.1f} ms/step (first step {r['first_step_s']:.1f} s)", flush=True)
            save()

        result["distill"] = distill_step_speed(model, batch=args.distill_batch, seq_len=args.distill_seq_len,
                                               steps=args.distill_steps, on_variant=progress)
        del model
        result["seconds"]["distill"] = time.perf_counter() - t0
        d = result["distill"]
        print(f"distill step: eager {d['eager']['seconds_per_step'] * 1e3:.1f} ms, compiled "
              f"{d['compiled']['seconds_per_step'] * 1e3:.1f} ms ({d['speedup']:.2f}x; opaque op "
              f"{d['compiled_opaque_op']['seconds_per_step'] * 1e3:.1f} ms, {d['speedup_opaque_op']:.2f}x); scales changed "
              f"{d['compiled']['scales_changed_fraction']:.3f}", flush=True)
        save()
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
