"""``dbllm-compile quantize``: the main job: load a model (the bundled SmolLM2-135M by
default), quantize its linears to dual-binary 2-bit weights (post-training initialisation),
convert to packed bits, evaluate perplexity of the full-precision and 2-bit models, print a
results table and write the packed model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .budgets import BUDGETS, calibration_data, calibration_only, resolve_budget

__all__ = ["BUDGETS", "DEFAULT_ACT_GROUP_SIZE", "DEFAULT_ROTATION_BLOCK", "add_parser", "run"]

DEFAULT_ROTATION_BLOCK = 64
"""``--rotation-block`` when the job distils (``DBLLMConfig.rotation_block`` itself defaults to 0 so
that stored configs keep their meaning). Measured 2026-11-24, SmolLM2-135M, WikiText-2 40 x 512:
H100 ``gpu`` budget W2A16 90.24 without rotation, 77.88 with blocks of 64; W(1+1)A4 (G=64)
209.2 -> 89.7 (docs/results.md 3.0, 4.4); with the larger end-to-end learning rates (DistillConfig
since 2026-11-24) 71.0 and 80.3 (3.0a, 4.5). CPU budget: 2,076 -> 1,004, 912 with the larger learning rates (results.md 2). The
post-training initialisation alone gets worse (21,535 -> 76,301 with 2 refinements), hence 0
with ``--no-distill``."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to ``sub`` (an argparse subparsers action)."""
    q = sub.add_parser("quantize", help="quantize, convert, evaluate and save a model (the main job)")
    q.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled, default), a local Hugging Face model directory, or a .gguf file")
    q.add_argument("--group-size", type=int, default=64, help="input features per scale group (default 64)")
    q.add_argument("--init", choices=["mse", "maxabs"], default="mse", help="scale initialisation (default mse)")
    q.add_argument("--codebook", choices=["binary", "sign"], default="binary",
                   help="2-bit weight codebook: 'binary' (DB-LLM a1*b1 + a2*b2, default) or 'sign' (LBLLM "
                        "symmetric levels: a1*b1 + a2*b2 + c with a learnable per-group offset c)")
    q.add_argument("--rotation-block", type=int, default=None, metavar="B",
                   help=f"rotate each quantized linear's input by a block-diagonal Hadamard matrix with blocks "
                        f"of B features (weights hold W @ Q; exact in full precision); 0 = none. Default "
                        f"{DEFAULT_ROTATION_BLOCK} when distilling (better after distillation: H100 gpu recipe "
                        f"90.2 -> 77.9, W(1+1)A4 209 -> 89.7; CPU budget 2,076 -> 1,004), 0 with --no-distill "
                        f"(worse for the post-training initialisation alone)")
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
    d = q.add_argument_group("distillation (data-free, deviation-aware; see docs/distillation.md)")
    d.add_argument("--no-distill", action="store_true", help="post-training initialisation only")
    d.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                   help="preset of the budgets below: 'cpu' (a few minutes on 2 cores, the default on CPU) "
                        "or 'gpu' (the one-GPU recipe, the default on CUDA)")
    d.add_argument("--steps", type=int, default=None, help="end-to-end distillation steps")
    d.add_argument("--block-steps", type=int, default=None, help="block-wise reconstruction steps per block")
    d.add_argument("--tokens", type=int, default=None, help="calibration tokens generated by the teacher")
    d.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence")
    d.add_argument("--gen-batch-size", type=int, default=None, metavar="N",
                   help="sequences the teacher generates together (default 64 on CPU; on CUDA the largest power "
                        "of two up to 1,024 whose KV caches fit in half the free GPU memory; same data either way)")
    d.add_argument("--block-sequences", type=int, default=None, metavar="N",
                   help="block-wise stage on the first N calibration sequences only (0: all; default: the "
                        "budget's, all on 'cpu', 1,024 on 'gpu'); caps the teacher values it keeps when --tokens "
                        "is large")
    d.add_argument("--calibration-only", action="store_true",
                   help="load the model, generate the calibration text into the on-disk cache (or find it there) "
                        "and stop: a later run with the same model, budget, --tokens, --calib-seq-len "
                        "and --seed reads it (any --gen-batch-size) instead of generating (e.g. on another machine "
                        "of the same kind, with $DBLLM_CACHE pointing to a copy of the cache)")
    d.add_argument("--batch-size", type=int, default=None, help="sequences per training step")
    d.add_argument("--loss", choices=["dad", "kl", "ce"], default="dad", help="end-to-end loss (default dad)")
    d.add_argument("--block-loss", choices=["global", "token", "channel"], default="global",
                   help="block-wise reconstruction loss (default global; docs/distillation.md)")
    d.add_argument("--scales-only", action="store_true", help="train the scales only, not the latent weights")
    for flag, field_name in (("--lr", "lr"), ("--latent-lr", "latent_lr"), ("--block-lr", "block_lr"),
                             ("--block-latent-lr", "block_latent_lr")):
        d.add_argument(flag, type=float, default=None, dest=field_name, metavar="LR",
                       help=f"peak learning rate: DistillConfig.{field_name} (default "
                            f"{getattr(_distill_defaults(), field_name):g}; docs/distillation.md)")
    d.add_argument("--corpus", type=Path, default=None, metavar="FILE",
                   help="UTF-8 text to calibrate on instead of (or mixed with, see --corpus-fraction) generated text")
    d.add_argument("--corpus-fraction", type=float, default=1.0,
                   help="fraction of calibration sequences taken from --corpus (default 1: corpus only)")
    d.add_argument("--weights-from", type=Path, default=None, metavar="RUN_DIR",
                   help="with --activation-bits 4: start stage 2 (weights) from the checkpoint of a finished "
                        "16-bit-activation run with the same model, data and budget (its OUT-run directory) "
                        "instead of training the weights again")
    d.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the end-to-end step with torch.compile(backend='dbllm'); default: on with "
                        "--device cuda, off on CPU; on CUDA the compiled step and the teacher run under CUDA graphs. "
                        "On an H100 the recipe's step took 0.077 s (about 13 steps/s; 1.5 eager; docs/results.md "
                        "3.0e); the first step pays the compile (~5 min)")
    d.add_argument("--compile-cache", default=None, metavar="FILE",
                   help="with the compiled step: load Inductor's compiled code for it from FILE when FILE exists, "
                        "and write FILE after the first step (torch's portable compile cache; carry it to a fresh "
                        "machine of the same kind to skip that part of the compile; DistillConfig.compile_cache)")
    d.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                   help="mixed precision of both distillation stages (DistillConfig.autocast): 'auto' (default) "
                        "runs in the exported dtype (TF32 matmuls on CUDA); 'bf16' runs the student and the "
                        "teacher under bf16 autocast after removing the exported graph's dtype assertions "
                        "(scales, latent weights, AdamW state and the loss stay float32; not yet measured on a "
                        "GPU, docs/distillation.md); 'none': the exported dtype, no TF32")
    d.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="profile N end-to-end steps (from the 20th) and write the ops with the most device time to "
                        "the run's metrics.jsonl as an 'e2e_profile' record (default 0: off)")
    d.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    d.add_argument("--seed", type=int, default=0, help="seed of calibration data and data order")
    a = q.add_argument_group("4-bit activations, W(1+1)A4 (three stages: init, weights, activations)")
    a.add_argument("--activation-bits", type=int, choices=[16, 4], default=16,
                   help="4: after distilling the weights with 16-bit activations, insert learnable dynamic "
                        "4-bit activation quantizers (see --act-group-size) and distil their clip factors "
                        "(default 16)")
    a.add_argument("--act-group-size", type=int, default=None, metavar="G",
                   help=f"with --activation-bits 4: one activation scale per token and group of G contiguous "
                        f"input features (default {DEFAULT_ACT_GROUP_SIZE}; must divide every layer's input "
                        "features), 0 = one scale per token. Per-token scales are wrecked by a few "
                        "massive-activation channels: on SmolLM2-135M (fp weights, fake A4, CPU, WikiText-2) "
                        "perplexity 6,910 per token vs 76.2 at G=64 and 48.3 at G=32 (fp 28.74). The int8 "
                        "Triton A4 kernels support only 0 so far")
    a.add_argument("--act-steps", type=int, default=None, help="end-to-end steps of the activation stage")
    q.set_defaults(run=run)
    return q


DEFAULT_ACT_GROUP_SIZE = 64
"""``--act-group-size`` for ``--activation-bits 4`` (``DBLLMConfig.activation_group_size`` itself
defaults to 0, per token, so that stored configs keep their meaning). Measured 2026-11-24 on CPU,
SmolLM2-135M with full-precision weights and fake 4-bit activations on every linear, WikiText-2,
40 windows of 512 tokens (``benchmarks/a4_granularity.py``, docs/results.md 4.3): perplexity
6,910 per token, 76.2 with groups of 64, 48.3 with groups of 32 (full precision 28.74). On the H100
with the same distilled weights, the W(1+1)A4 pipeline ended at 412 with G=64 against 8,058 per
token."""

def _distill_defaults() -> Any:
    from dbllm_compile.distill import DistillConfig

    return DistillConfig()


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


def _fit_rotation_block(config: Any, model: Any, console: Any) -> Any:
    """The default rotation block, halved until it divides the input features of every linear
    module of ``model`` (0 below 8, with a note): a model whose widths are not multiples of 64
    still runs with the default command line. An explicit ``--rotation-block`` is never changed
    (a misfit is then the pass's error, naming the layer)."""
    import dataclasses
    import math

    import torch

    widths = {int(m.weight.shape[1]) for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m.weight.dim() == 2}
    widths |= {int(m.weight.shape[0]) for m in model.modules()  # GPT-2 style Conv1D: weight [in, out]
               if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    common = math.gcd(*widths) if widths else config.rotation_block
    block = config.rotation_block
    while block >= 8 and common % block:
        block //= 2
    block = block if block >= 8 else 0
    if block != config.rotation_block:
        console.print(f"  note: --rotation-block {config.rotation_block} does not divide every linear's input "
                      f"features (their gcd is {common}); using {block}" + (" (no rotation)" if not block else ""))
        config = dataclasses.replace(config, rotation_block=block)
    return config


def _evaluate_naive_a4(qmodel, evaluate, rows) -> None:
    """Evaluate the freshly inserted 4-bit activation quantizers with naive max-abs scaling (clip
    ratio 1), the baseline that the distilled clip factors must beat; the factors are restored."""
    import torch

    import dbllm_compile as dc

    clips = list(qmodel.activation_parameters())
    initial = [c.detach().clone() for c in clips]
    with torch.no_grad():
        for c in clips:
            c.fill_(30.0)  # sigmoid(30) == 1.0 in float32: every token scaled by its max |x|
    evaluate("a4-maxabs", dc.convert(qmodel, progress=False))
    rows.append(("a4-maxabs", "W2A4, naive max-abs activations (packed)"))
    with torch.no_grad():
        for c, value in zip(clips, initial):
            c.copy_(value)


def run(args: argparse.Namespace) -> int:
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
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    kwargs: dict[str, Any] = dict(
        group_size=args.group_size,
        init=args.init,
        codebook=args.codebook,
        rotation_block=(args.rotation_block if args.rotation_block is not None
                        else 0 if args.no_distill else DEFAULT_ROTATION_BLOCK),
        exclude=tuple(args.exclude),
        keep_head=not args.quantize_head,
    )
    if args.include:
        kwargs["include"] = tuple(args.include)
    if args.init_refine_iters is not None:
        kwargs["init_refine_iters"] = args.init_refine_iters
    if args.weights_from is not None and (args.activation_bits != 4 or args.no_distill):
        from dbllm_compile.errors import ConfigError

        raise ConfigError("--weights-from starts the weight stage of the W(1+1)A4 pipeline: use it with "
                          "--activation-bits 4 (and without --no-distill)")
    if args.calibration_only and args.no_distill:
        from dbllm_compile.errors import ConfigError

        raise ConfigError("--calibration-only prepares the distillation's calibration text: drop --no-distill")
    if args.act_group_size is not None and args.activation_bits != 4:
        from dbllm_compile.errors import ConfigError

        raise ConfigError("--act-group-size sets the granularity of the 4-bit activation scales: use it with "
                          "--activation-bits 4")
    if args.activation_bits == 4:
        # the W(1+1)A4 stages add the quantizers later (add_activation_quant / distill_w2a4 read it)
        kwargs["activation_group_size"] = DEFAULT_ACT_GROUP_SIZE if args.act_group_size is None else args.act_group_size
    config = dc.DBLLMConfig(**kwargs)  # validates before any slow work
    distill_cfg = None
    budget: dict[str, int] = {}
    if not args.no_distill:
        from dbllm_compile.distill import DistillConfig, LossSpec

        budget = resolve_budget(args, device)
        distill_cfg = DistillConfig(steps=budget["steps"], block_steps=budget["block_steps"],
                                    batch_size=budget["batch_size"], block_batch_size=budget["batch_size"],
                                    loss=LossSpec(args.loss), train_latent=not args.scales_only, seed=args.seed,
                                    block_loss=args.block_loss, block_sequences=budget["block_sequences"],
                                    **{k: getattr(args, k) for k in ("lr", "latent_lr", "block_lr", "block_latent_lr")
                                       if getattr(args, k) is not None},
                                    # a checkpoint holds latents + AdamW state (~1.6 GB for 135M, 2-4 s
                                    # on the H100 machines): at most one every 2 minutes
                                    checkpoint_every=25, checkpoint_seconds=120.0,
                                    profile_steps=args.profile_steps, autocast=args.autocast,
                                    compile=args.compile if args.compile is not None else device.type == "cuda",
                                    compile_cache=args.compile_cache or "")
    texts: dict[str, str] = {}
    extra_files: set[str] = set()
    if not args.no_default_text:
        texts["python-docs (default)"] = default_eval_text()
    if args.eval_text is not None:
        texts[str(args.eval_text)] = load_eval_text(args.eval_text)
        extra_files.add(str(args.eval_text))
    timings: dict[str, float] = {}

    with _stage(timings, "load", console):
        model, tokenizer = load_model(args.model, device=device)
    if args.calibration_only:
        return calibration_only(args, model, tokenizer, budget, console)
    if args.rotation_block is None and config.rotation_block:
        config = _fit_rotation_block(config, model, console)
    example = torch.randint(0, min(1000, model.config.vocab_size), (2, 16), device=device)
    with _stage(timings, "quantize", console):
        qmodel = dc.quantize(model, (example,), config, example_kwargs={"use_cache": False})
    console.print(qmodel.report.summary())
    if args.activation_bits == 4:  # the quantizers come after the weight stage: check G now, not then
        from dbllm_compile.passes.activation_quant import check_activation_group_size

        check_activation_group_size(qmodel.graph_module, config.activation_group_size)

    results: dict[str, Any] = {"model": args.model, "config": config.to_dict(), "device": str(device),
                               "perplexity": {}}
    ids_of = {label: tokenizer(text, return_tensors="pt").input_ids for label, text in texts.items()}

    def evaluate(which: str, m: Any) -> None:
        for label, ids in ids_of.items():
            with _stage(timings, f"eval {which} [{label}]", console):
                r = perplexity(m, ids, seq_len=args.seq_len, max_windows=args.windows, desc=f"{which} {label}")
            results["perplexity"].setdefault(label, {})[which] = r.perplexity
            results["perplexity"][label]["windows"] = r.windows

    evaluate("fp", model)
    rows = [("fp", f"full precision ({str(next(model.parameters()).dtype).split('.')[-1]})")]
    if distill_cfg is not None:
        from dbllm_compile.distill import distill

        evaluate("ptq", dc.convert(qmodel, progress=False))  # packed: same function, cheaper forward
        rows.append(("ptq", "2-bit, post-training init"))
        with _stage(timings, "calibration data", console):
            data = calibration_data(args, model, tokenizer, budget, console)
        results["calibration"] = {"source": data.source, "tokens": data.tokens, "seconds": data.seconds,
                                  "from_cache": data.from_cache}
        run_dir = args.out.with_name(args.out.name + "-run")
        if args.activation_bits == 4:
            from dbllm_compile.distill import DistillConfig, distill_w2a4

            def on_stage_end(name: str, student: Any) -> None:
                if name == "weights":
                    evaluate("2bit", dc.convert(student, progress=False))
                    rows.append(("2bit", "2-bit weights, 16-bit activations (distilled)"))
                elif name == "activations-init":
                    _evaluate_naive_a4(student, evaluate, rows)

            act_cfg = DistillConfig(steps=budget["act_steps"], batch_size=budget["batch_size"],
                                    loss=distill_cfg.loss, seed=args.seed, compile=distill_cfg.compile,
                                    autocast=distill_cfg.autocast, compile_cache=distill_cfg.compile_cache)
            with _stage(timings, "distill (weights, then activations)", console):
                runs = distill_w2a4(qmodel, model, data.input_ids, distill_cfg, act_cfg, out_dir=run_dir,
                                    on_stage_end=on_stage_end, weights_from=args.weights_from)
            run = runs["weights"]
            ratios = [float(torch.sigmoid(c.detach())) for c in qmodel.activation_parameters()]
            results["distill_activations"] = {
                "config": act_cfg.to_dict(), "seconds": runs["activations"].seconds,
                "final_loss": runs["activations"].losses[-1] if runs["activations"].losses else None,
                "quantizers": len(ratios), "clip_ratio_min": min(ratios), "clip_ratio_max": max(ratios),
                "run_dir": str(runs["activations"].out_dir)}
        else:
            with _stage(timings, "distill", console):
                run = distill(qmodel, model, data.input_ids, distill_cfg, out_dir=run_dir)
        results["distill"] = {"config": distill_cfg.to_dict(), "budget": budget, "seconds": run.seconds,
                              "final_loss": run.losses[-1] if run.losses else None,
                              "block_rel_err": [(r["before"], r["after"]) for r in run.block_records],
                              "run_dir": str(run.out_dir)}
    elif args.activation_bits == 4:  # post-training only: insert the quantizers (clip ratio 0.95)
        evaluate("2bit", dc.convert(qmodel, progress=False))
        rows.append(("2bit", "2-bit weights, 16-bit activations"))
        dc.add_activation_quant(qmodel)
        _evaluate_naive_a4(qmodel, evaluate, rows)
    final = "w2a4" if args.activation_bits == 4 else "2bit"
    with _stage(timings, "convert", console):
        deployed = dc.convert(qmodel)
    del qmodel
    evaluate(final, deployed)
    if final == "w2a4":
        rows.append((final, "W2A4, clip factors distilled (packed)" if distill_cfg is not None else "W2A4, clip 0.95 (packed)"))
    else:
        rows.append((final, "2-bit, distilled (packed)" if distill_cfg is not None else "2-bit, packed"))

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
    a4 = ""
    if args.activation_bits == 4:
        g = config.activation_group_size
        a4 = f", A4 {'per token' if g == 0 else f'per {g} features'}"
    table = Table(title=f"dbllm-compile quantize: {args.model}, W2 (dual-binary, {config.codebook} codebook) "
                        f"g{config.group_size}{a4}")
    table.add_column("model")
    for label in texts:
        shown = Path(label).name if label in extra_files else label
        table.add_column(f"ppl {escape(shown)}\n({results['perplexity'][label]['windows']}x{args.seq_len} tok)", justify="right")
    table.add_column("size MB", justify="right")
    table.add_column("bits/weight\n(quantized linears)", justify="right")
    for key, name in rows:
        bits = f"{size.bits_per_weight:.3f}" if key != "fp" else ("32" if "float32" in name else "16")
        mb = f"{size.total_mb:.1f}" if key != "fp" else f"{fp_bytes / 1e6:.1f}"
        table.add_row(name, *[f"{results['perplexity'][t][key]:.2f}" for t in texts], mb, bits)
    timing = Table(title="time per stage")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for k, v in timings.items():
        timing.add_row(escape(k), f"{v:.1f}")
    out_console = Console()
    out_console.print(table)
    out_console.print(timing)
    out_console.print(f"packed model written to {out}/ (model.safetensors + dbllm.json)")
    if distill_cfg is None:
        out_console.print("note: post-training initialisation only; 2-bit accuracy needs distillation.")
    else:
        out_console.print(f"distillation run (checkpoint, metrics.jsonl, plots): {results['distill']['run_dir']}/")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0
