"""Atomic, pickle-free training checkpoints and a JSON-lines metrics log.

A checkpoint is one ``torch.save`` file written to a temporary name in the same directory and
moved into place with ``os.replace``: a run killed at any moment leaves the previous checkpoint
or the new one, never a torn file. It holds only tensors, numbers, strings, lists and dicts, and
is read back with ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.errors import ArtifactError

__all__ = ["save_checkpoint", "load_checkpoint", "MetricsLog"]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved at ``path``, or None if there is none.

    Raises:
        ArtifactError: the file exists but cannot be read (names the file and the fix).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or not ours
        raise ArtifactError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); delete it to "
            "start the run from the beginning"
        ) from err


class MetricsLog:
    """Append-only JSON-lines log (one object per line, with a wall-clock ``time``)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
