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
        labels, values = ["fp16 inductor", "2-bit dbllm"], [d["baseline"]["decode_tokens_per_s"], d["dbllm"]["decode_tokens_per_s"]]
        if "dbllm_unfused" in d:
            labels.append("2-bit dbllm\nunfused")
            values.append(d["dbllm_unfused"]["decode_tokens_per_s"])
        panels.append(("decode tokens/s (batch 1)", labels, values))
        if d["baseline"].get("peak_memory_bytes"):
            panels.append(("peak memory (GB)", ["fp16 inductor", "2-bit dbllm"],
                           [d["baseline"]["peak_memory_bytes"] / 1e9, d["dbllm"]["peak_memory_bytes"] / 1e9]))
    for block, d in result.get("distill_by_rotation", {}).items():
        names = [v for v in ("eager", "compiled", "compiled_opaque_op") if v in d]
        if names:
            suffix = f", rotation {block}" if block != "0" else ""
            panels.append((f"distillation step (ms){suffix}", [v.replace("_op", "\nop").replace("_", " ") for v in names],
                           [1e3 * d[v]["seconds_per_step"] for v in names]))
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
    ap.add_argument("--distill-layers", type=int, default=None, help="override SmolLM2's 30 layers (faster compile)")
    ap.add_argument("--distill-rotation", default="0",
                    help="comma-separated rotation blocks to time the step with (e.g. 0,64: without and with "
                         "Hadamard-rotated linear inputs)")
    ap.add_argument("--distill-variants", default="eager,compiled,compiled_opaque_op")
    ap.add_argument("--distill-profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS steps of each variant (top kernels by device time)")
    ap.add_argument("--distill-adamw", default="fused",
                    help="comma-separated AdamW implementations to time the step with: fused (what the "
                         "distillation stages use on CUDA) and/or foreach (PyTorch's default before); "
                         "'fused+bf16' also runs the forward and loss under bf16 autocast")
    ap.add_argument("--decode-unfused", action="store_true",
                    help="also time the 2-bit model with fuse_siblings=False and fuse_glu=False (q/k/v, gate "
                         "and up as separate kernels), in the same run")
    ap.add_argument("--decode-no-glu", action="store_true",
                    help="also time the 2-bit model with fuse_glu=False (gate/up as one sibling-fused linear "
                         "plus Inductor's silu * up kernel), in the same run")
    ap.add_argument("--decode-no-pdl", action="store_true",
                    help="also time the 2-bit model with pdl=False (gemvs and Inductor's kernels launched without "
                         "programmatic dependent launch), in the same run")
    ap.add_argument("--decode-variant", action="append", default=[], metavar="NAME=JSON",
                    help="also time the 2-bit model with these backend options (JSON, on top of init=maxabs), "
                         "as variant NAME, in the same run; repeatable. E.g. "
                         "'combo={\"inductor_options\": {\"combo_kernels\": true}}'")
    ap.add_argument("--decode-profile", type=int, default=0, metavar="TOKENS",
                    help="also profile one generation of TOKENS new tokens per variant (top kernels by device time)")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--attention", choices=["sdpa", "dbllm"], default="sdpa",
                    help="decode attention of both models: PyTorch SDPA, or the Triton decode-attention kernel "
                         "(dbllm_compile.attention)")
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
        extra = {}
        if args.decode_unfused:
            extra["dbllm_unfused"] = {"init": "maxabs", "fuse_siblings": False, "fuse_glu": False}
        if args.decode_no_glu:
            extra["dbllm_no_glu"] = {"init": "maxabs", "fuse_glu": False}
        if args.decode_no_pdl:
            extra["dbllm_no_pdl"] = {"init": "maxabs", "pdl": False}
        for spec in args.decode_variant:
            name, sep, raw = spec.partition("=")
            if not sep or not name.isidentifier():
                ap.error(f"--decode-variant {spec!r}: expected NAME=JSON with NAME an identifier")
            try:
                extra[f"dbllm_{name}"] = {"init": "maxabs", **json.loads(raw)}
            except (json.JSONDecodeError, TypeError) as e:
                ap.error(f"--decode-variant {spec!r}: the options are not a JSON object ({e})")
        result["decode"] = decode_speed(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                        options={"init": "maxabs"}, extra=extra or None,
                                        profile_tokens=args.decode_profile, attention=args.attention)
        result["decode"]["layers"] = model.config.num_hidden_layers
        del model
        torch.cuda.empty_cache() if device == "cuda" else None
        result["seconds"]["decode"] = time.perf_counter() - t0
        d = result["decode"]
        named = {"dbllm_unfused": "without fusions", "dbllm_no_glu": "without the GLU fusion",
                 "dbllm_no_pdl": "without PDL"}
        for name in extra:
            what = named.get(name, f"variant {name.removeprefix('dbllm_')} {extra[name]}")
            if name in d:
                print(f"decode: 2-bit {what} {d[name]['decode_tokens_per_s']:.1f} tok/s "
                      f"({d['decode_speedup_' + name]:.2f}x)", flush=True)
        print(f"decode: fp16 {d['baseline']['decode_tokens_per_s']:.1f} tok/s, 2-bit {d['dbllm']['decode_tokens_per_s']:.1f} "
              f"tok/s ({d['decode_speedup']:.2f}x); prefill {d['prefill_speedup']:.2f}x; "
              f"peak {d['baseline']['peak_memory_bytes']} vs {d['dbllm']['peak_memory_bytes']} bytes", flush=True)
        save()
    if "distill" in parts:
        t0 = time.perf_counter()
        model = llama_model("smollm2-135m", device, torch.float32, args.distill_layers)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        variants = tuple(v for v in args.distill_variants.split(",") if v)
        result["distill_by_rotation"] = {}
        runs = [(int(b), impl) for b in args.distill_rotation.split(",") for impl in args.distill_adamw.split(",")]
        for block, impl in runs:
            partial: dict = {}
            key = str(block) if impl == "fused" else f"{block}_{impl}"

            def progress(name: str, r: dict, block: int = block, impl: str = impl) -> None:
                partial[name] = r
                result["distill_partial"] = {"rotation_block": block, "adamw": impl, **partial}
                print(f"distill rotation {block} adamw {impl} {name}: {r['seconds_per_step'] * 1e3:.1f} ms/step "
                      f"(first step {r['first_step_s']:.1f} s)", flush=True)
                for row in r.get("profile", [])[:15]:
                    print(f"    {row['us_per_step']:10.1f} us/step {row['calls_per_step']:6.1f}x  {row['name']}", flush=True)
                save()

            d = distill_step_speed(model, batch=args.distill_batch, seq_len=args.distill_seq_len,
                                   steps=args.distill_steps, on_variant=progress, rotation_block=block,
                                   variants=variants, profile_steps=args.distill_profile,
                                   fused_adamw=impl.startswith("fused"), bf16=impl.endswith("+bf16"))
            result["distill_by_rotation"][key] = d
            if key == "0":
                result["distill"] = d
            line = ", ".join(f"{v} {d[v]['seconds_per_step'] * 1e3:.1f} ms" for v in variants)
            print(f"distill step, rotation {block}, adamw {impl}: {line}; scales changed "
                  f"{d[variants[-1]]['scales_changed_fraction']:.3f}", flush=True)
        del model
        result["seconds"]["distill"] = time.perf_counter() - t0
        save()
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
