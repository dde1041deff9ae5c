"""Accuracy cost of the integer-level forms of the A4 GEMM (``levels="group"`` / ``"row"``), on a real model.

The A4 kernels (``backends/triton/a4.py``) can replace each group's levels ``{0, a2, a1, a1 + a2}``
by integer multiples of one step: per (row, group), ``t = max(|a1|, |a2|, |a1 + a2|) / 127``
(``"group"``), or per output row, the largest of those over the row's groups (``"row"``, one int8
product over all of K). Except where ``i1 + i2`` is clamped at +-127 (counted, reported) that is
the same dual-binary layer with float32 scales ``(t * rint(a1 / t), t * rint(a2 / t))``
(``a4_reference.level_scales``), so its accuracy can be measured with the reference ops on CPU.
This script loads a trained artifact and, per level mode, reports the per-layer relative error
of the three levels (``||levels' - levels|| / ||levels||`` over ``a1, a2, a1 + a2``, the metric
of the 2026-11-23 run) and of the weights (``||W' - W|| / ||W||``, ``a4_reference.int_level_error``:
levels weighted by how often their codes occur), then the WikiText-2 perplexity with 16-bit
activations (the weight effect alone) and, on the first ``--kl-windows`` windows, the mean KL
divergence of the next-token distributions from those of the exact levels and how often the
top-1 token agrees (more sensitive than the perplexity of a weak model, whose small changes can go
either way).

    python benchmarks/a4_int_levels.py --artifact out/ --eval-text ../shared/data/wikitext2/wiki.test.raw \\
        --windows 40 --json benchmarks/results/a4_int_levels.json
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

from dbllm_compile.artifact.rebuild import load_deployed
from dbllm_compile.evaluate import _logits_of, load_eval_text, perplexity, window_ids
from dbllm_compile.models import load_model
from dbllm_compile.ops import DEPLOY_OP, op_arguments


def _layer_errors(a1: torch.Tensor, a2: torch.Tensor, packed: torch.Tensor, k: int, g: int,
                  levels: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The float32 scales of ``levels`` and the layer's errors (module docstring)."""
    from dbllm_compile.backends.triton.a4_reference import W_QMAX, int_level_error, int_levels, row_int_levels
    from dbllm_compile.backends.triton.layout import to_gpu_layout

    old = torch.stack([a1.float(), a2.float(), a1.float() + a2.float()])
    if levels == "exact":
        n1, n2, new, clamped = a1.float(), a2.float(), old, 0
    else:
        t, i1, i2 = int_levels(a1, a2) if levels == "group" else row_int_levels(a1, a2)
        t = t if levels == "group" else t[:, None]
        n1, n2 = t * i1, t * i2
        new = torch.stack([n1, n2, t * (i1 + i2).clamp(-W_QMAX, W_QMAX)])  # the kernels' sum level
        clamped = int(((i1 + i2).abs() > W_QMAX).sum())
    gw = to_gpu_layout(packed, a1, a2, k, g, a1.dtype)  # the scales stay in their dtype (fp16 here)
    return n1, n2, {"rel_level_error": float((new - old).norm() / old.norm()),
                    "rel_weight_error": int_level_error(gw, levels)["rel_level_error"], "clamped_groups": clamped}


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return [torch.log_softmax(_logits_of(model(ids[i:i + 1])).float()[0, :-1], dim=-1) for i in range(ids.shape[0])]


def _divergence(ref: list[torch.Tensor], new: list[torch.Tensor]) -> dict:
    """Mean ``KL(p_ref || p_new)`` per predicted token (nats) and the top-1 agreement rate."""
    kl = torch.cat([(r.exp() * (r - n)).sum(-1) for r, n in zip(ref, new)])
    agree = torch.cat([r.argmax(-1) == n.argmax(-1) for r, n in zip(ref, new)])
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(agree.float().mean()),
            "kl_tokens": int(kl.numel())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--model", default="smollm2-135m", help="source model (for the tokenizer and architecture)")
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--levels", default="exact,group,row", help="comma-separated level modes to evaluate")
    ap.add_argument("--kl-windows", type=int, default=4, help="windows for the KL/top-1 comparison with 'exact'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from dbllm_compile.backends.triton.a4_reference import check_levels

    modes = [check_levels(m.strip(), "--levels") for m in args.levels.split(",")]
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    deployed = load_deployed(args.artifact, model=model)
    text = load_eval_text(args.eval_text)
    result: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if not torch.cuda.is_available()
                    else platform.machine(), "torch": torch.__version__, "artifact": args.artifact,
                    "windows": args.windows, "seq_len": 512, "activations": "16-bit (weight effect alone)", "levels": {}}
    nodes = [n for n in deployed.graph_module.graph.nodes if n.op == "call_function" and n.target == DEPLOY_OP]
    layers = []
    for node in nodes:
        a = op_arguments(node)
        layers.append((a["a1"].target, deployed._attr(a["a1"].target), deployed._attr(a["a2"].target),
                       deployed._attr(a["packed"].target), a["in_features"], a["group_size"]))
    originals = [(a1.data, a2.data) for _, a1, a2, *_ in layers]
    kl_ids = window_ids(tok(text, return_tensors="pt").input_ids[0], 512, args.kl_windows)
    ref_log_probs = _log_probs(deployed, kl_ids)  # the artifact as it is: levels="exact"
    for mode in modes:
        t1 = time.perf_counter()
        per_layer, sums = {}, {"rel_level_error": [], "rel_weight_error": [], "clamped_groups": []}
        for (name, a1, a2, packed, k, g), (o1, o2) in zip(layers, originals):
            n1, n2, err = _layer_errors(o1, o2, packed.data, k, g, mode)
            per_layer[name] = err
            for key in sums:
                sums[key].append(err[key])
            a1.data, a2.data = (o1, o2) if mode == "exact" else (n1, n2)  # float32 scales: t * i exactly
        ppl = perplexity(deployed, tok, text, max_windows=args.windows, desc=f"levels={mode}").perplexity
        div = _divergence(ref_log_probs, _log_probs(deployed, kl_ids))
        result["levels"][mode] = {
            "perplexity": ppl,
            **div,
            "rel_level_error_mean": sum(sums["rel_level_error"]) / len(layers),
            "rel_level_error_max": max(sums["rel_level_error"]),
            "rel_weight_error_mean": sum(sums["rel_weight_error"]) / len(layers),
            "rel_weight_error_max": max(sums["rel_weight_error"]),
            "clamped_groups": sum(sums["clamped_groups"]),
            "seconds": time.perf_counter() - t1,
            "layers": per_layer,
        }
        print(f"levels={mode:5s}: perplexity {ppl:.2f}; relative level error mean "
              f"{result['levels'][mode]['rel_level_error_mean']:.2e}, max {result['levels'][mode]['rel_level_error_max']:.2e};"
              f" relative weight error mean {result['levels'][mode]['rel_weight_error_mean']:.2e}, max "
              f"{result['levels'][mode]['rel_weight_error_max']:.2e}; clamped groups "
              f"{result['levels'][mode]['clamped_groups']} ({len(layers)} layers); KL from exact {div['kl_mean']:.2e} "
              f"nats/token, top-1 agreement {div['top1_agreement']:.4f}", flush=True)
    for (_, a1, a2, *_), (o1, o2) in zip(layers, originals):
        a1.data, a2.data = o1, o2
    result["layers"] = len(layers)
    result["seconds"] = time.perf_counter() - t0
    print(f"total {result['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
