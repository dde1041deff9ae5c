"""Writing a deployed model to disk, atomically.

Layout of an artifact directory (format version 1)::

    model.safetensors   every tensor of the deployed graph module (tied tensors once)
    dbllm.json          manifest: format version, config, library version, source model,
                        per-layer layout, aliases of tied tensors, sha256 of model.safetensors

The directory is written under a temporary name next to the destination and renamed into place,
so a crash leaves the previous artifact or none, never a half-written one. Loading an artifact
back into a runnable model is not implemented yet (it needs the source architecture's config;
see the artifacts issue).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.errors import ArtifactError

__all__ = ["ARTIFACT_VERSION", "save_deployed"]

ARTIFACT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_deployed(model: DBLLMModel, out_dir: str | os.PathLike, *, source: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write a deployed (converted) model to ``out_dir`` atomically; returns the path.

    Example:
        >>> # deployed = dbllm_compile.convert(qmodel); save_deployed(deployed, "out/")
    """
    from safetensors.torch import save_file

    import dbllm_compile

    if not isinstance(model, DBLLMModel) or model.stage != "deploy":
        raise ArtifactError(f"save_deployed() takes the output of convert(), got {getattr(model, 'stage', type(model).__name__)!r}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    state = model.graph_module.state_dict(keep_vars=False)
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        manifest = {
            "format": "dbllm_compile.deployed",
            "format_version": ARTIFACT_VERSION,
            "library_version": dbllm_compile.__version__,
            "torch_version": torch.__version__,
            "config": model.config.to_dict(),
            "source_model": source or {},
            "layers": [vars(layer) for layer in model.report.rewritten],
            "aliases": aliases,
            "sha256": {"model.safetensors": _sha256(tmp / "model.safetensors")},
            **(extra or {}),
        }
        with open(tmp / "dbllm.json", "w") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
