"""Plot the M=1 kernel benchmark: per shape, cuBLAS fp16 / best tensor-core config / best gemv config (us).

    python3 benchmarks/plot_gemv.py [--json benchmarks/results/gemv_h100_2026-11-24/bench_kernels_m1.json]
                                    [--out docs/img/gemv_m1_h100.png]

Reads a ``bench_kernels.py --m 1`` JSON (fields ``cublas_us``, ``tc_us``/``tc_config``,
``gemv_us``/``gemv_config``, each timed on its own stack of layers in the same run) and writes
a grouped bar chart. Only matplotlib and the JSON are needed (no GPU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/gemv_h100_2026-11-24/bench_kernels_m1.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/img/gemv_m1_h100.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.json.read_text())
    info = data["info"]
    rows = [r for r in data["results"] if r["M"] == 1 and "tc_us" in r and "gemv_us" in r]
    if not rows:
        raise SystemExit(f"{args.json}: no M=1 rows with tc_us and gemv_us")
    series = [("cuBLAS fp16", "cublas_us", "#7f7f7f"),
              ("2-bit, best tensor-core config", "tc_us", "#1f77b4"),
              ("2-bit, best gemv config", "gemv_us", "#d62728")]
    width = 0.27
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, (label, key, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        vals = [r[key] for r in rows]
        bars = ax.bar(xs, vals, width, label=label, color=color)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['N']}x{r['K']}\n(tuned {r['speedup']:.2f}x)" for r in rows])
    ax.set_ylabel("us per layer (M=1, fp16, cold L2, CUDA graph)")
    ax.set_title(f"dual-binary W2 (G=64) at batch 1 vs cuBLAS fp16, {info['gpu']}, {info['date']}\n"
                 f"torch {info['torch']}, Triton {info['triton']}; speed-up: tuned choice over cuBLAS", fontsize=10)
    ax.legend()
    ax.set_ylim(0, max(r["cublas_us"] for r in rows) * 1.1)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
