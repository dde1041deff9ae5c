"""``dbllm-compile generate``: generate text with a model compiled by ``torch.compile(backend="dbllm")``.

Static KV cache and compiled prefill/decode steps (:mod:`dbllm_compile.generate`); the linears
are quantized on the fly (post-training initialisation: without distillation a small model's
2-bit text is poor, see docs/compile.md). ``--backend inductor`` or ``eager`` runs the
full-precision model through the same loop for comparison.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run", "add_model_arguments", "resolve_device_dtype", "load_for", "backend_options"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``generate`` and ``bench``."""
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled, default), a local Hugging Face directory, or a .gguf file")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--init", choices=["mse", "maxabs"], default="mse",
                   help="on-the-fly scale initialisation (default mse; maxabs is fast but much less accurate)")
    p.add_argument("--group-size", type=int, default=64, help="input features per scale group (default 64)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="layer-name pattern to keep in full precision; repeatable")
    p.add_argument("--mode", default="auto",
                   help="compile mode of the decode step: 'auto' (reduce-overhead on CUDA), 'default', 'reduce-overhead'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def resolve_device_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_for(args: argparse.Namespace) -> tuple[Any, Any]:
    """Offline mode, CPU threads, device and dtype from ``args``; returns ``load_model(args.model)``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dbllm_compile.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args)
    return load_model(args.model, dtype=dtype, device=device)


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"init": args.init, "group_size": args.group_size, "exclude": list(args.exclude)}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("generate", help="generate text through torch.compile(backend='dbllm') with a static KV cache")
    add_model_arguments(p)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["dbllm", "inductor", "eager"], default="dbllm")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from dbllm_compile.backends.dynamo import reset_stats, stats
    from dbllm_compile.generate import StaticCacheGenerator

    model, tokenizer = load_for(args)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    backend = None if args.backend == "eager" else args.backend
    reset_stats()  # the report covers this command's graphs only (not earlier compiles in the process)
    gen = StaticCacheGenerator(
        model, max_cache_len=ids.shape[1] + args.max_new_tokens + 8, backend=backend,
        options=backend_options(args) if backend == "dbllm" else None,
        mode=None if args.mode == "default" else args.mode,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = gen.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          eos_token_id=tokenizer.eos_token_id, generator=generator)
    text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, **result.to_dict(),
                          "backend_stats": stats().to_dict() if backend == "dbllm" else None}, indent=2))
    else:
        print(f"{args.prompt}{text}")
        print(f"\n[{args.backend}, {device}, {dtype}] prompt {result.prompt_tokens} tokens; "
              f"{result.tokens.shape[1]} new tokens; first call (includes compilation): prefill "
              f"{result.prefill_seconds:.2f} s, decode {result.decode_tokens_per_s:.1f} tokens/s")
        if backend == "dbllm":
            print(stats().summary())
    return 0
