"""The ``torch.compile`` backend ``"dbllm"`` (installed as ``dbllm_compile.backends.dynamo``).

``torch.compile(model, backend="dbllm")`` works after ``pip install`` with no import: the
``torch_dynamo_backends`` entry point in ``pyproject.toml`` names :func:`.backend.dbllm_backend`,
and Dynamo registers it on first lookup. Nothing here registers the name at import time (doing
so as well trips Dynamo's "duplicate name" assertion); :func:`register` exists for source trees
that were never installed.

- :mod:`.options`: :class:`CompileOptions` (``options={...}``, validated).
- :mod:`.lowering`: the graph rewrites (on-the-fly quantization, lowering of existing ops).
- :mod:`.fusion`: horizontal fusion of sibling ``db_linear_gpu`` calls (``q/k/v``, ``gate/up``).
- :mod:`.weights`: quantized weights cached per parameter; the artifact hook.
- :mod:`.diagnostics`: counters (:func:`stats`, :func:`reset_stats`) and logging.
- :mod:`.backend`: :func:`dbllm_backend` itself.

See ``docs/compile.md``.
"""

from __future__ import annotations

from .backend import BACKEND_NAME, dbllm_backend, register
from .diagnostics import CompileStats, GraphRecord, reset_stats, stats
from .options import CompileOptions
from .weights import clear_weight_cache, weight_cache_size

__all__ = [
    "BACKEND_NAME",
    "CompileOptions",
    "CompileStats",
    "GraphRecord",
    "clear_weight_cache",
    "dbllm_backend",
    "register",
    "reset_stats",
    "stats",
    "weight_cache_size",
]
