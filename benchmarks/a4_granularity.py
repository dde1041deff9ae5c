"""Which 4-bit activation granularity survives SmolLM2's massive activations? (CPU, minutes)

Full-precision weights; every decoder linear's input fake-quantized to 4 bits (codes in [-7, 7],
round half to even, max-abs scale, r = 1) by a forward pre-hook, in one of these forms:

- ``token``: one scale per token over all K features (the quantizer of the W(1+1)A4 pipeline
  with ``act_group_size=0``);
- ``keep k``: per token, the k input channels with the largest calibration max kept in full
  precision (chosen on a short calibration text, per layer);
- ``group G``: one scale per token per group of G contiguous features (``act_group_size=G``);
- ``hadamard G2``: each group of 64 features rotated by a 64x64 Hadamard matrix first (exact in
  full precision if the weights were rotated the same way), then per-token (G2 = 0) or per-group
  (G2 = 64) scales.

It isolates the activation error: no weight is quantized. ``--clip R [R ...]`` repeats every form
with the scale ``r * max|x| / 7`` for each fixed clip ratio ``r`` (what the learnable factor of
the W(1+1)A4 quantizer can reach at best with one ratio for all layers); ``--forms`` picks forms
by name (e.g. ``"hadamard 64"``).

    python benchmarks/a4_granularity.py --text ../shared/data/wikitext2/wiki.test.raw --windows 40 \
        --json benchmarks/results/a4_granularity_cpu_2026-11-24.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch

from dbllm_compile.evaluate import load_eval_text, perplexity
from dbllm_compile.models import load_model

FORMS = [None, ("token", 0), ("keep", 4), ("keep", 16), ("group", 64), ("group", 32), ("hadamard", 0), ("hadamard", 64)]


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _q4(x: torch.Tensor, group: int = 0, r: float = 1.0) -> torch.Tensor:
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], -1, group)
    m = x.abs().amax(-1, keepdim=True)
    s = torch.where(m > 0, r * m / 7, torch.ones_like(m))
    return (torch.clamp(torch.round(x / s), -7, 7) * s).reshape(shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clip", type=float, nargs="+", default=[1.0], help="fixed clip ratios r (default 1)")
    ap.add_argument("--forms", nargs="+", default=None,
                    help="forms to run by name, e.g. 'full precision' 'hadamard 64' (default all)")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    text = load_eval_text(args.text)
    h64 = _hadamard(64)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]

    def calibrate(mod, inputs):
        a = inputs[0].detach().abs().flatten(0, -2).amax(0)
        mod._cal = torch.maximum(getattr(mod, "_cal", a), a)

    handles = [m.register_forward_pre_hook(calibrate) for m in linears]
    ids = tok("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    form = {"v": None, "r": 1.0}

    def hook(mod, inputs):
        x, v = inputs[0], form["v"]
        if v is None:
            return None
        kind, k = v
        r = form["r"]
        if kind == "token":
            return (_q4(x, 0, r),)
        if kind == "keep":
            idx = mod._cal.argsort(descending=True)[:k]
            y = _q4(x.index_fill(-1, idx, 0.0), 0, r)
            y[..., idx] = x[..., idx]
            return (y,)
        if kind == "group":
            return (_q4(x, k, r),)
        shape = x.shape  # hadamard
        xr = (x.reshape(*shape[:-1], -1, 64) @ h64).reshape(shape)
        return ((_q4(xr, k, r).reshape(*shape[:-1], -1, 64) @ h64.T).reshape(shape),)

    for m in linears:
        m.register_forward_pre_hook(hook)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "windows": args.windows, "perplexity": {}, "seconds": {}}
    runs = [(v, r) for v in FORMS for r in ([1.0] if v is None else args.clip)]
    for v, r in runs:
        form["v"], form["r"] = v, r
        name = "full precision" if v is None else f"{v[0]} {v[1]}"
        if args.forms is not None and name not in args.forms:
            continue
        name += f" r={r:g}" if r != 1.0 else ""
        t0 = time.perf_counter()
        ppl = perplexity(model, tok, text, seq_len=512, max_windows=args.windows, progress=False).perplexity
        result["perplexity"][name], result["seconds"][name] = ppl, time.perf_counter() - t0
        print(f"{name:>16}: {ppl:,.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
