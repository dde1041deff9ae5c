"""Accuracy cost of the one-product-per-group form of the A4 GEMM (``INT_LEVELS``), on a real model.

The kernel (``backends/triton/a4.py``) can replace each group's levels ``{0, a2, a1, a1 + a2}``
by integer multiples of one step ``t = max(|a1|, |a2|, |a1 + a2|) / 127``. Without the clamp at
+-127 that is the same dual-binary layer with scales ``(t * rint(a1 / t), t * rint(a2 / t))``, so
its accuracy can be measured with the reference ops on CPU: this script loads a trained artifact,
reports the per-layer relative level error, then the WikiText-2 perplexity of the artifact as it
is and with the integer-level scales (16-bit activations: the weight effect alone).

    python benchmarks/a4_int_levels.py --artifact out/ --eval-text ../shared/data/wikitext2/wiki.test.raw \
        --windows 40 --json benchmarks/results/a4_int_levels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from dbllm_compile.artifact.rebuild import load_deployed
from dbllm_compile.evaluate import load_eval_text, perplexity
from dbllm_compile.models import load_model
from dbllm_compile.ops import DEPLOY_OP, op_arguments


def _int_level_scales(a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales ``(t * i1, t * i2)`` of the kernel's integer-level form (``a4.int_levels``)."""
    from dbllm_compile.backends.triton.a4 import int_levels

    t, i1, i2 = int_levels(a1, a2)
    return (t * i1).to(a1.dtype), (t * i2).to(a2.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--model", default="smollm2-135m", help="source model (for the tokenizer and architecture)")
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    deployed = load_deployed(args.artifact, model=model)
    text = load_eval_text(args.eval_text)
    result: dict = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                    "artifact": args.artifact, "windows": args.windows, "layers": {}}
    result["ppl_exact"] = perplexity(deployed, tok, text, max_windows=args.windows, desc="exact levels").perplexity
    nodes = [n for n in deployed.graph_module.graph.nodes if n.op == "call_function" and n.target == DEPLOY_OP]
    errors = []
    for node in nodes:
        a = op_arguments(node)
        a1 = deployed._attr(a["a1"].target)
        a2 = deployed._attr(a["a2"].target)
        n1, n2 = _int_level_scales(a1.data, a2.data)
        levels = torch.stack([a1.float(), a2.float(), (a1.float() + a2.float())])
        new = torch.stack([n1.float(), n2.float(), (n1.float() + n2.float())])
        err = float((new - levels).norm() / levels.norm())
        errors.append(err)
        result["layers"][a["a1"].target] = err
        a1.data.copy_(n1)
        a2.data.copy_(n2)
    result["rel_level_error_mean"] = sum(errors) / len(errors)
    result["rel_level_error_max"] = max(errors)
    result["ppl_int_levels"] = perplexity(deployed, tok, text, max_windows=args.windows, desc="integer levels").perplexity
    result["seconds"] = time.perf_counter() - t0
    print(f"perplexity exact {result['ppl_exact']:.2f}, integer levels {result['ppl_int_levels']:.2f}; relative level "
          f"error mean {result['rel_level_error_mean']:.2e}, max {result['rel_level_error_max']:.2e} "
          f"({len(errors)} layers, {result['seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
