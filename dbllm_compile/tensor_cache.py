"""A cache of values derived from tensors, keyed by the tensors' identity and version.

The backend and the kernel dispatcher derive weights once per layer (quantized, repacked for the
GPU, concatenated for sibling fusion) and reuse them across calls and compiled graphs. An entry
is valid while every source tensor is the same live object at the same version counter (an
in-place update invalidates it) and is dropped as soon as one of them is garbage-collected, so the
cache never keeps a model's weights alive by itself.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Hashable, Sequence

import torch

__all__ = ["TensorCache"]


class TensorCache:
    """``get``/``put`` values keyed by ``(source tensors, extra hashable key)``; thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensors: Sequence[torch.Tensor], extra: Hashable) -> tuple:
        return (tuple(id(t) for t in tensors), extra)

    def get(self, tensors: Sequence[torch.Tensor], extra: Hashable = None) -> Any:
        """The value stored for these tensors and ``extra``, or None (absent or stale)."""
        entry = self._entries.get(self._key(tensors, extra))
        if entry is None:
            return None
        refs, versions, value = entry
        if all(r() is t for r, t in zip(refs, tensors)) and versions == tuple(t._version for t in tensors):
            return value
        return None

    def put(self, tensors: Sequence[torch.Tensor], value: Any, extra: Hashable = None) -> Any:
        """Store ``value`` for these tensors and ``extra``; returns ``value``."""
        key = self._key(tensors, extra)
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors), value)
        for t in tensors:
            weakref.finalize(t, self._evict, key)
        return value

    def _evict(self, key: tuple) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
