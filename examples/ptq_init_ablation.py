"""Post-training initialisation of the dual-binary scales: which choice of step matters.

Quantizes the bundled SmolLM2-135M (all 210 decoder linears, group 64, head in full precision)
with several initialisations and measures WikiText-2 test perplexity with the fixed protocol of
the results page (whole text tokenized once, first 40 non-overlapping windows of 512 tokens).

    python examples/ptq_init_ablation.py --text ../shared/data/wikitext2/wiki.test.raw --out ablation/

Writes ``ablation.json`` and ``ablation.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import dbllm_compile as dc
from dbllm_compile.evaluate import load_eval_text, perplexity
from dbllm_compile.models import load_model

VARIANTS = {
    "maxabs (s = max|w|/2)": dict(init="maxabs"),
    "mse grid, 48 steps (default)": dict(init="mse"),
    "mse grid + 2 least-squares refinements": dict(init="mse", init_refine_iters=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=Path("../shared/data/wikitext2/wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("ablation"))
    parser.add_argument("--only", action="append", default=None, help="run only variants containing this text")
    args = parser.parse_args()

    model, tokenizer = load_model()
    ids = tokenizer(load_eval_text(args.text), return_tensors="pt").input_ids
    example = (torch.randint(0, 1000, (2, 16)),)
    rows = []
    fp = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows, desc="fp32")
    rows.append({"variant": "full precision (fp32)", "ppl": fp.perplexity, "quantize_s": 0.0})
    for name, kw in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        t = time.perf_counter()
        q = dc.quantize(model, example, dc.DBLLMConfig(**kw), example_kwargs={"use_cache": False})
        seconds = time.perf_counter() - t
        r = perplexity(dc.convert(q, progress=False), ids, seq_len=args.seq_len, max_windows=args.windows, desc=name)
        rows.append({"variant": name, "config": kw, "ppl": r.perplexity, "quantize_s": seconds})
        print(f"{name:45s} ppl {r.perplexity:14.2f}   (init {seconds:.0f} s)", flush=True)
        del q

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "text": str(args.text), "windows": args.windows, "seq_len": args.seq_len,
            "tokens": int(ids.numel())}
    (args.out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [r["variant"] for r in rows]
    values = [r["ppl"] if math.isfinite(r["ppl"]) else float("nan") for r in rows]
    ax.barh(labels[::-1], values[::-1], color=["#4c72b0"] * (len(rows) - 1) + ["#55a868"])
    ax.set_xscale("log")
    ax.set_xlabel(f"WikiText-2 test perplexity ({args.windows} x {args.seq_len} tokens, log scale)")
    ax.set_title("SmolLM2-135M, W2 dual-binary g64, post-training init only")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:,.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "ablation.png", dpi=120)
    print(f"wrote {args.out}/ablation.json and ablation.png")


if __name__ == "__main__":
    main()
