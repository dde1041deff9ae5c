"""``dbllm-compile export``: turn a saved artifact (``dbllm-compile quantize``'s output directory)
into another format: a verified copy of the checkpoint, a Hugging Face directory, a ``.pt2``
ExportedProgram, an AOTInductor package or MLIR. Prints what was written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "add_parser", "run"]

FORMATS = ("safetensors", "hf", "pt2", "aoti", "mlir")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``sub`` (an argparse subparsers action)."""
    e = sub.add_parser("export", help="export a saved artifact to safetensors, hf, pt2, aoti or mlir (see README: Artifacts)")
    e.add_argument("artifact", type=Path, help="artifact directory written by `dbllm-compile quantize` (model.safetensors + dbllm.json)")
    e.add_argument("--format", choices=FORMATS, required=True,
                   help="safetensors: verified re-save of the checkpoint; hf: save_pretrained directory; "
                        "pt2: torch.export program; aoti: AOTInductor package; mlir: torch-mlir text")
    e.add_argument("--out", type=Path, default=None,
                   help="output path (default: next to the artifact, e.g. ARTIFACT-hf/ or ARTIFACT.pt2)")
    e.add_argument("--device", default="cpu", help="aoti: 'cpu' (ATen decomposition) or 'cuda' (Triton kernels)")
    e.add_argument("--mlir-dialect", choices=["torch", "linalg-on-tensors"], default="linalg-on-tensors",
                   help="mlir: 'torch' keeps db_linear as a named op; 'linalg-on-tensors' decomposes it (default)")
    e.set_defaults(run=run)
    return e


def _default_out(artifact: Path, fmt: str, args: argparse.Namespace) -> Path:
    stem = artifact.resolve()
    return {
        "safetensors": stem.with_name(stem.name + "-copy"),
        "hf": stem.with_name(stem.name + "-hf"),
        "pt2": stem.with_suffix(".pt2") if stem.suffix else stem.with_name(stem.name + ".pt2"),
        "aoti": stem.with_name(f"{stem.name}-aoti-{args.device.split(':')[0]}.pt2"),
        "mlir": stem.with_name(f"{stem.name}-{args.mlir_dialect}.mlir"),
    }[fmt]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dbllm_compile.artifact import artifact_info, load_deployed

    console = Console(stderr=True)
    out = args.out or _default_out(args.artifact, args.format, args)
    timings: dict[str, float] = {}
    with console.status(f"loading {args.artifact} (verifying checksums, rebuilding from the stored architecture)"):
        t0 = time.perf_counter()
        info = artifact_info(args.artifact)
        deployed = load_deployed(args.artifact)
        timings["load"] = time.perf_counter() - t0
    console.print(f"loaded {info.summary()}")
    with console.status(f"writing {args.format} to {out}"):
        t0 = time.perf_counter()
        loads_with = _export(args, deployed, out)
        timings[args.format] = time.perf_counter() - t0
    table = Table(title=f"dbllm-compile export --format {args.format}")
    table.add_column("")
    table.add_column("")
    table.add_row("written", str(out))
    table.add_row("size", f"{_size(out) / 1e6:.2f} MB (checkpoint: {info.bytes_on_disk / 1e6:.2f} MB)")
    table.add_row("dual-binary layers", f"{info.layers} ({info.bits_per_weight:.3f} bits/weight)")
    table.add_row("load it with", loads_with)
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    Console().print(table)
    return 0


def _export(args: argparse.Namespace, deployed: Any, out: Path) -> str:
    fmt = args.format
    if fmt == "safetensors":
        from dbllm_compile.artifact import save_deployed

        save_deployed(deployed, out, source={"exported_from": str(args.artifact)})
        return f"dbllm_compile.artifact.load_deployed({str(out)!r})"
    if fmt == "hf":
        from dbllm_compile.artifact.hf import to_hf

        to_hf(deployed).save_pretrained(str(out))
        return f"import dbllm_compile; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    if fmt == "pt2":
        from dbllm_compile.artifact.pt2 import save_pt2

        save_pt2(deployed, out)
        return f"import dbllm_compile; torch.export.load({str(out)!r}).module()"
    if fmt == "aoti":
        from dbllm_compile.artifact.aoti import aoti_package

        aoti_package(deployed, out, device=args.device)
        return f"torch._inductor.aoti_load_package({str(out)!r}) (no dbllm_compile needed), or C++: examples/aoti_cpp"
    from dbllm_compile.artifact.mlir import save_mlir

    save_mlir(deployed, out, args.mlir_dialect)
    return "any MLIR tool (e.g. mlir-opt); dbllm_compile.artifact.mlir.run_linalg runs linalg-on-tensors on CPU"
