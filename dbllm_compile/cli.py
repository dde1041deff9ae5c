"""The ``dbllm-compile`` command line.

``dbllm-compile quantize`` is the main job: load a model (the bundled SmolLM2-135M by
default), quantize its linears to dual-binary 2-bit weights (post-training initialisation),
convert to packed bits, evaluate perplexity of the full-precision and 2-bit models, print a
results table and write the packed model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbllm-compile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize, convert, evaluate and save a model (the main job)")
    q.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled, default), a local Hugging Face model directory, or a .gguf file")
    q.add_argument("--group-size", type=int, default=64, help="input features per scale group (default 64)")
    q.add_argument("--init", choices=["mse", "maxabs"], default="mse", help="scale initialisation (default mse)")
    q.add_argument("--init-refine-iters", type=int, default=None,
                   help="least-squares refinements of the scales after the grid search (default: the config's)")
    q.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="layer-name pattern to quantize (glob or re:REGEX); repeatable; default all")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="layer-name pattern to keep in full precision; repeatable")
    q.add_argument("--quantize-head", action="store_true", help="also quantize output heads")
    q.add_argument("--eval-text", type=Path, default=None, metavar="FILE",
                   help="also evaluate perplexity on this UTF-8 text file")
    q.add_argument("--windows", type=int, default=16,
                   help="perplexity windows per text (default 16; the results page uses 40)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    q.add_argument("--no-default-text", action="store_true",
                   help="skip the built-in default text (Python's bundled documentation)")
    q.add_argument("--out", type=Path, default=Path("dbllm-out"), help="output directory (default ./dbllm-out)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.add_argument("--json", action="store_true", help="print the results as JSON too")
    return parser


def _stage(timings: dict[str, float], name: str, console: Any):
    from rich.markup import escape

    shown = escape(name)

    class _Timer:
        def __enter__(self):
            console.print(f"[bold]>[/bold] {shown} ...")
            self.t = time.perf_counter()
            return self

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.t
            if exc[0] is None:
                console.print(f"  {shown} done in {timings[name]:.1f} s")
            return False

    return _Timer()


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import dbllm_compile as dc
    from dbllm_compile.artifact import save_deployed
    from dbllm_compile.evaluate import default_eval_text, load_eval_text, perplexity
    from dbllm_compile.models import load_model, model_identity

    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs: dict[str, Any] = dict(
        group_size=args.group_size,
        init=args.init,
        exclude=tuple(args.exclude),
        keep_head=not args.quantize_head,
    )
    if args.include:
        kwargs["include"] = tuple(args.include)
    if args.init_refine_iters is not None:
        kwargs["init_refine_iters"] = args.init_refine_iters
    config = dc.DBLLMConfig(**kwargs)  # validates before any slow work
    texts: dict[str, str] = {}
    extra_files: set[str] = set()
    if not args.no_default_text:
        texts["python-docs (default)"] = default_eval_text()
    if args.eval_text is not None:
        texts[str(args.eval_text)] = load_eval_text(args.eval_text)
        extra_files.add(str(args.eval_text))
    timings: dict[str, float] = {}

    with _stage(timings, "load", console):
        model, tokenizer = load_model(args.model)
    example = torch.randint(0, min(1000, model.config.vocab_size), (2, 16))
    with _stage(timings, "quantize", console):
        qmodel = dc.quantize(model, (example,), config, example_kwargs={"use_cache": False})
    console.print(qmodel.report.summary())
    with _stage(timings, "convert", console):
        deployed = dc.convert(qmodel)
    del qmodel

    results: dict[str, Any] = {"model": args.model, "config": config.to_dict(), "perplexity": {}}
    for label, text in texts.items():
        ids = tokenizer(text, return_tensors="pt").input_ids
        for which, m in (("fp", model), ("2bit", deployed)):
            with _stage(timings, f"eval {which} [{label}]", console):
                r = perplexity(m, ids, seq_len=args.seq_len, max_windows=args.windows,
                               desc=f"{which} {label}")
            results["perplexity"].setdefault(label, {})[which] = r.perplexity
            results["perplexity"][label]["windows"] = r.windows

    fp_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    size = deployed.size_report()
    with _stage(timings, "save", console):
        out = save_deployed(deployed, args.out, source=model_identity(args.model), extra={"results": results})
    results.update(
        fp_mb=fp_bytes / 1e6,
        dbllm_mb=size.total_mb,
        quantized_weights=size.quantized_weights,
        bits_per_weight=size.bits_per_weight,
        layers_rewritten=len(deployed.report.rewritten),
        layers_skipped=[s.name for s in deployed.report.skipped],
        seconds=timings,
        out=str(out),
    )
    table = Table(title=f"dbllm-compile quantize: {args.model}, W2 (dual-binary) g{config.group_size}")
    table.add_column("model")
    for label in texts:
        table.add_column(f"ppl {escape(Path(label).name if label in extra_files else label)}\n({results['perplexity'][label]['windows']}x{args.seq_len} tok)", justify="right")
    table.add_column("size MB", justify="right")
    table.add_column("bits/weight\n(quantized linears)", justify="right")
    fp_dtype = str(next(model.parameters()).dtype).split(".")[-1]
    table.add_row(f"full precision ({fp_dtype})", *[f"{results['perplexity'][t]['fp']:.2f}" for t in texts],
                  f"{fp_bytes / 1e6:.1f}", "32" if fp_dtype == "float32" else "16")
    table.add_row(f"dual-binary, {len(deployed.report.rewritten)} linears", *[f"{results['perplexity'][t]['2bit']:.2f}" for t in texts],
                  f"{size.total_mb:.1f}", f"{size.bits_per_weight:.3f}")
    timing = Table(title="time per stage")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for k, v in timings.items():
        timing.add_row(escape(k), f"{v:.1f}")
    out_console = Console()
    out_console.print(table)
    out_console.print(timing)
    out_console.print(f"packed model written to {out}/ (model.safetensors + dbllm.json)")
    out_console.print("note: post-training initialisation only; 2-bit accuracy needs distillation.")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dbllm-compile`` console script."""
    from dbllm_compile.errors import DBLLMError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return _cmd_quantize(args)
    except DBLLMError as exc:
        print(f"dbllm-compile: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
