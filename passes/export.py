"""Export a model to an FX graph with ``torch.export``."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from dbllm_compile.errors import GraphPassError

__all__ = ["export_model", "auto_dynamic_shapes"]


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` on every dimension of every tensor input, keyed by ``forward``'s parameters.

    ``Dim.AUTO`` lets export keep a dimension dynamic where the model allows it and specialise
    it where it does not (e.g. a feature dimension consumed by a linear), so no per-model
    knowledge is needed. Dimensions of size 0 or 1 in the example inputs always specialise: use
    examples with batch and sequence >= 2.
    """
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: Dim.AUTO for i in range(value.dim())}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def export_model(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> tuple[ExportedProgram, list[str]]:
    """Export ``model`` in training IR; returns the program and notes for the pass report.

    With ``dynamic=True`` every input dimension is marked ``Dim.AUTO``; if that export fails the
    model is exported with static shapes and a note says why.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> ep, notes = export_model(m, (torch.randn(2, 8),))
        >>> sum(n.target == torch.ops.aten.linear.default for n in ep.graph.nodes)
        1
    """
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        args = (args,)
    notes: list[str] = []
    if dynamic:
        try:
            shapes = auto_dynamic_shapes(model, args, kwargs)
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False), notes
        except Exception as exc:  # noqa: BLE001 - any export failure falls back to static shapes
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"dynamic export failed ({type(exc).__name__}: {first}); exported with static shapes")
    try:
        return torch.export.export(model, args, kwargs, strict=False), notes
    except Exception as exc:
        raise GraphPassError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "dbllm_compile needs a model that torch.export can trace (no data-dependent Python "
            "control flow on tensor values); pass the inputs the model is called with in "
            "production (e.g. use_cache=False for Hugging Face causal LMs)"
        ) from exc
