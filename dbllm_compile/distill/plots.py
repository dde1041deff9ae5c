"""PNG plots of a distillation run: loss curves, per-block reconstruction error, DAD weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def plot_run(records: list[dict[str, Any]], result: Any, out: Path) -> list[Path]:
    """Write ``loss.png``, ``block_error.png`` and (for DAD) ``dad_weights.png`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    e2e = [r for r in records if r.get("stage") == "e2e" and "loss" in r]
    blocks = [r for r in records if r.get("stage") == "blocks" and "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if blocks:
        axes[0].plot([r["loss"] for r in blocks], lw=0.8)
        axes[0].set_yscale("log")
    axes[0].set_title("block-wise stage: relative squared error per step")
    axes[0].set_xlabel("step (all blocks, in order)")
    if e2e:
        axes[1].plot([r["step"] for r in e2e], [r["loss"] for r in e2e], lw=0.8)
        axes[1].set_yscale("log")
    axes[1].set_title("end-to-end stage: distillation loss")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if result.block_records:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        names = [r["block"].split(".")[-1] for r in result.block_records]
        x = range(len(names))
        ax.plot(x, [r["before"] for r in result.block_records], "o-", ms=3, label="post-training init")
        ax.plot(x, [r["after"] for r in result.block_records], "o-", ms=3, label="after block-wise training")
        ax.set_yscale("log")
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_xlabel("block")
        ax.set_ylabel("||y_q - y_fp||^2 / ||y_fp||^2")
        ax.set_title("per-block reconstruction error (quantized inputs from the blocks before)")
        ax.legend()
        fig.tight_layout()
        written.append(out / "block_error.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    quant = [r for r in e2e if "dad_weight_quantiles" in r]
    if quant:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["5%", "25%", "50%", "75%", "95%"]
        for i, label in enumerate(labels):
            ax.plot([r["step"] for r in quant], [r["dad_weight_quantiles"][i] for r in quant], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("per-token DAD weight w_t (mean 1)")
        ax.set_title("distribution of the per-token DAD-ED weights")
        ax.legend(title="quantile", fontsize=7)
        fig.tight_layout()
        written.append(out / "dad_weights.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
