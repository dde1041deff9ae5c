"""A portable cache of the compiled end-to-end step (``DistillConfig.compile_cache``).

The compiled step (:mod:`dbllm_compile.distill.step`) pays its compile before the first step:
364 s on a fresh H100 machine for SmolLM2-135M in the ``gpu`` recipe (docs/results.md 3.0g).
Inductor keeps what it compiled in a local cache directory, which a fresh machine does not
have. This module moves it between machines through one file, with torch's own serialization
of its compile caches (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``, the
"mega-cache": Inductor's FX-graph cache entries with their generated kernels, and autotuning
results).

- :func:`load_compile_cache` runs before the step is compiled. A missing file is not an error
  (the first run writes it). An unreadable file, or one from another torch version, only warns
  (:class:`CompileCacheWarning`): a cache never stops a run, and its entries are keyed by torch,
  Triton, the device and the graph, so a stale entry is a miss, never a wrong kernel.
- :func:`save_compile_cache` runs after the first step, when everything is compiled, and writes
  the file atomically, xz-compressed (``lzma`` preset 1: 14x smaller on a CPU end-to-end step's cache of
  Inductor's C++ kernels, ~50 MB/s on 2 cores; files written before compression existed still load). The GPU
  cache's ratio is not measured yet; the aim is one file of a 30-layer step small enough to carry
  to a fresh machine in one upload.

What it saves is Inductor's part (and, where torch can, AOTAutograd's): Dynamo's tracing and the
CUDA-graph recording run again. Measured (docs/results.md 3.0g, "The compile cache"):

- H100, torch 2.11, 8 SmolLM2-shaped layers through ``benchmarks/distill_host.py``, each run with
  fresh Inductor and Triton cache directories (a fresh machine): first step 119.8 s without the
  file, 40.3 s with it (a 25 MB file: 3 Inductor graphs, 1 AOTAutograd entry, 38 autotuning
  results); the same losses and step time (28.8 / 29.0 ms).
- CPU (2 cores, torch 2.13, a 4-layer Llama of width 128): 47 s -> 32 s.
"""

from __future__ import annotations

import logging
import lzma
import os
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["CompileCacheWarning", "load_compile_cache", "save_compile_cache"]

logger = logging.getLogger(__name__)


_XZ_MAGIC = b"\xfd7zXZ\x00"


class CompileCacheWarning(UserWarning):
    """A compile-cache file could not be read or written; the run goes on without it."""


def load_compile_cache(path: str | os.PathLike) -> dict[str, Any] | None:
    """Load the compile caches stored in ``path`` into this process's Inductor caches.

    Returns a summary (``{"file": ..., "bytes": ..., "artifacts": {kind: count}}``), or None when
    the file does not exist or cannot be used (then a :class:`CompileCacheWarning` says why).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        stored = path.read_bytes()
        data = lzma.decompress(stored) if stored.startswith(_XZ_MAGIC) else stored  # raw: an older file
        info = torch.compiler.load_cache_artifacts(data)  # None for a corrupted file (torch logs why)
        why = None if info is not None else "torch could not deserialize it"
    except Exception as err:  # noqa: BLE001  (a cache must never stop a run)
        why = f"{type(err).__name__}: {err}"
    if why is not None:
        warnings.warn(f"compile cache {path} is unusable ({why}); compiling without it. "
                      "Delete the file to silence this; the run writes a new one.", CompileCacheWarning, stacklevel=2)
        return None
    artifacts = {kind: len(keys) for kind, keys in getattr(info, "artifacts", {}).items()}
    logger.info("compile cache %s loaded: %d bytes (%d in the file), %s", path, len(data), len(stored), artifacts)
    return {"file": str(path), "bytes": len(stored), "raw_bytes": len(data), "artifacts": artifacts}


def save_compile_cache(path: str | os.PathLike) -> dict[str, Any] | None:
    """Write this process's compile caches to ``path`` (atomically). Returns a summary like
    :func:`load_compile_cache`'s, or None when there was nothing to save or writing failed."""
    from dbllm_compile.artifact.atomic import atomic_file

    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data, info = saved
        stored = lzma.compress(data, preset=1)
        with atomic_file(path) as tmp:
            tmp.write_bytes(stored)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"could not write the compile cache {path} ({type(err).__name__}: {err}); the run goes on",
                      CompileCacheWarning, stacklevel=2)
        return None
    artifacts = {kind: len(keys) for kind, keys in getattr(info, "artifacts", {}).items()}
    return {"file": str(path), "bytes": len(stored), "raw_bytes": len(data), "artifacts": artifacts}
