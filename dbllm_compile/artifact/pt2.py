"""The deployed model as a ``torch.export`` ExportedProgram (``.pt2``).

The program keeps the dual-binary layers as ``torch.ops.dbllm.db_linear`` nodes (packed planes
and scales are its buffers), with dynamic batch and sequence where the model allows, and the
model's own input and output structure (e.g. ``CausalLMOutputWithPast``). Loading it needs the
op definitions: ``import dbllm_compile`` before ``torch.export.load``.

Example::

    import torch, dbllm_compile
    from dbllm_compile.artifact.pt2 import save_pt2
    save_pt2(deployed, "model.pt2")
    # any process:
    import dbllm_compile, torch
    ep = torch.export.load("model.pt2")
    logits = ep.module()(input_ids, use_cache=False).logits
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from dbllm_compile.api import DBLLMModel
from dbllm_compile.artifact.atomic import atomic_file
from dbllm_compile.artifact.source import make_example_inputs
from dbllm_compile.errors import ArtifactError

__all__ = ["export_program", "save_pt2", "example_inputs_of"]


def example_inputs_of(
    deployed: DBLLMModel,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """Example ``(args, kwargs)`` to export ``deployed`` with: the given ones, else tensors of
    the recorded example shapes; the fixed keyword arguments are always added."""
    if example_inputs is None:
        if deployed.example_spec is None:
            raise ArtifactError(
                "this model was quantized with example inputs that are not plain tensors, so their "
                "shapes were not recorded; pass example_inputs=(...) (and example_kwargs=...)"
            )
        example_inputs, tensor_kwargs = make_example_inputs(deployed.example_spec)
        example_kwargs = {**tensor_kwargs, **(example_kwargs or {})}
    return tuple(example_inputs), {**(example_kwargs or {}), **deployed.fixed_kwargs}


def _require_deployed(model: Any, what: str) -> DBLLMModel:
    if not isinstance(model, DBLLMModel) or model.stage != "deploy":
        got = getattr(model, "stage", type(model).__name__)
        raise ArtifactError(f"{what} takes a deployed model (dbllm_compile.convert() or load_deployed()), got {got!r}")
    return model


def export_program(
    deployed: DBLLMModel,
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
) -> ExportedProgram:
    """Export the deployed graph again as a standalone ExportedProgram.

    Args:
        deployed: the output of :func:`dbllm_compile.convert` or
            :func:`~dbllm_compile.artifact.load_deployed`.
        example_inputs / example_kwargs: defaults to tensors of the shapes it was quantized with.
        dynamic: ``Dim.AUTO`` on every input dimension (batch and sequence stay dynamic where
            the model allows; falls back to static shapes if that export fails).
    """
    from dbllm_compile.passes.export import export_model

    _require_deployed(deployed, "export_program()")
    args, kwargs = example_inputs_of(deployed, example_inputs, example_kwargs)
    ep, _ = export_model(deployed.graph_module, args, kwargs, dynamic=dynamic)
    return ep


def save_pt2(deployed: DBLLMModel, path: str | os.PathLike, **export_kwargs: Any) -> Path:
    """Export (:func:`export_program`) and write the program to ``path`` atomically."""
    ep = export_program(deployed, **export_kwargs)
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.export.save(ep, str(tmp))
    return path
