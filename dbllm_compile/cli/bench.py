"""``dbllm-compile bench``: prefill and decode tokens/s and peak memory, 2-bit through
``torch.compile(backend="dbllm")`` against the same model through plain ``torch.compile``
(Inductor) in the model dtype (fp16 on CUDA), in the same run.

Compilation and warm-up are timed separately from the steady state (best of three runs). Peak
memory is CUDA memory only (``n/a`` on CPU). The on-the-fly mode keeps the model's
full-precision weights (the model object owns them), so the 2-bit run's peak includes them; the
table also lists the weight bytes of both forms. On CPU the dual-binary linears run the
pure-PyTorch reference (dequantize, then a dense matmul): slower than the baseline by design;
speed is a GPU matter.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dbllm_compile.cli.generate import add_model_arguments, backend_options, load_for

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("bench", help="prefill/decode tokens/s and peak memory: 2-bit (dbllm backend) vs the model dtype (inductor)")
    add_model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run, init="maxabs")
    return p


def _fmt_mem(b: Any) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> int:
    from dbllm_compile.bench import decode_speed

    model, _ = load_for(args)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    result = decode_speed(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          options=backend_options(args), mode=None if args.mode == "default" else args.mode)
    result.update(device=str(device), model=args.model)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    base, q = result["baseline"], result["dbllm"]
    print(f"{args.model} on {device}, {dtype}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'':24}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak memory':>14}{'compile+warmup':>16}")
    for name, r in ((f"{str(dtype).split('.')[-1]} (inductor)", base), ("2-bit (dbllm)", q)):
        print(f"{name:24}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>15.1f}"
              f"{_fmt_mem(r['peak_memory_bytes']):>14}{r['compile_and_warmup_s']:>15.1f}s")
    print(f"decode speedup {result['decode_speedup']:.2f}x, prefill speedup {result['prefill_speedup']:.2f}x; "
          f"full-precision weights {result['fp_weight_bytes'] / 2**20:.0f} MiB (kept by the model object)")
    return 0
