"""Load a dbllm artifact back into a runnable :class:`~dbllm_compile.DBLLMModel`.

No original weights are needed and nothing is unpickled:

1. the manifest and ``model.safetensors`` are read and verified
   (:func:`~dbllm_compile.artifact.checkpoint.read_checkpoint`);
2. the source architecture is built with no weights: a Hugging Face model from the stored config
   on the meta device (:func:`~dbllm_compile.artifact.source.build_skeleton`), then given
   uninitialised CPU storage (``to_empty``: no initialisation cost), or the module the caller
   passes;
3. it is exported again with the stored example shapes and fixed keyword arguments, and the
   rewrite and pack passes run *structurally* (``structure_only=True``: no initialisation, no
   bit assignment, placeholder tensors of the right shapes);
4. the rebuilt layers are checked against the manifest, and every tensor of the graph module is
   replaced by the stored one (names, dtypes and shapes must all match).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.artifact.checkpoint import graph_tensors, read_checkpoint
from dbllm_compile.artifact.format import MANIFEST_FILE, WEIGHTS_FILE
from dbllm_compile.artifact.source import build_skeleton, make_example_inputs
from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ArtifactError, ConfigError
from dbllm_compile.passes.export import export_model
from dbllm_compile.passes.pack_linears import pack_linears
from dbllm_compile.passes.quantize_linears import QuantizedLayer, quantize_linears

__all__ = ["apply_layers", "load_deployed", "rebuild_structure"]

_LAYER_KEYS = ("name", "weight", "in_features", "out_features", "padded_in_features", "layout")


def _set_tensor(gm: torch.nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if kind == "parameter":
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif kind == "buffer":
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _cast_skeleton(model: torch.nn.Module, stored: dict[str, dict[str, Any]], aliases: dict[str, str]) -> None:
    """Give the (meta) skeleton's tensors the stored dtypes, so export traces the same casts."""
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                info = stored.get(aliases.get(name, name))
                if info is None:
                    continue
                dtype = getattr(torch, info["dtype"])
                if t.dtype != dtype:
                    cast = t.detach().to(dtype)
                    table[attr] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cast


def rebuild_structure(
    model: torch.nn.Module,
    config: DBLLMConfig,
    example_args: tuple,
    example_kwargs: dict[str, Any],
) -> tuple[torch.fx.GraphModule, list[QuantizedLayer]]:
    """Export ``model`` and rewrite it into the deploy form with placeholder tensors.

    Returns the graph module (dual-binary nodes in place, packed planes and scales zeros) and the
    rewritten layers. ``model``'s weights are never read (they may be on the meta device).
    """
    ep, _ = export_model(model, example_args, example_kwargs, dynamic=config.dynamic)
    gm = ep.module()
    report = quantize_linears(gm, config, structure_only=True)
    with torch.no_grad():
        pack_linears(gm, structure_only=True)
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, report.rewritten


def _check_layers(where: Path, manifest_layers: list[dict[str, Any]], rebuilt: list[QuantizedLayer]) -> None:
    want = {d["name"]: tuple(d[k] for k in _LAYER_KEYS) for d in manifest_layers}
    got = {q.name: tuple(getattr(q, k) for k in _LAYER_KEYS) for q in rebuilt}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differ = sorted(n for n in set(want) & set(got) if want[n] != got[n])
        detail = "; ".join(
            f"{n}: stored {dict(zip(_LAYER_KEYS, want[n]))}, rebuilt {dict(zip(_LAYER_KEYS, got[n]))}" for n in differ[:2]
        )
        raise ArtifactError(
            f"{where}: the rebuilt model's dual-binary layers differ from the stored ones (not rebuilt: "
            f"{missing[:5]}, unexpected: {extra[:5]}, different: {differ[:5]}{'; ' + detail if detail else ''}); "
            "the architecture, config or library versions differ from the save: pass the exact model "
            "architecture (model=...) or use the library versions recorded in the manifest"
        )


def load_deployed(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    verify: bool = True,
) -> DBLLMModel:
    """Load an artifact written by :func:`~dbllm_compile.artifact.save_deployed`.

    Args:
        path: the artifact directory.
        model: a module of the source architecture (its weights are not used; a meta-device
            module is fine). Needed when the source was not a Hugging Face model; by default a
            Hugging Face model is built from the stored config on the meta device.
        example_inputs / example_kwargs: example inputs for the re-export, when the manifest has
            none (the source was exported with inputs that are not plain tensors).
        verify: check the format version and the checksums (default; turning it off only skips
            the sha256 of the weight file).

    Returns:
        A :class:`DBLLMModel` in the ``"deploy"`` stage, on CPU, computing exactly what the saved
        model computed.

    Raises:
        ArtifactError: a missing, corrupt, truncated, tampered or wrong-version file (named), or
            an architecture that does not rebuild into the stored layers.

    Example:
        >>> # deployed = load_deployed("dbllm-out")
        >>> # deployed(input_ids).logits
    """
    directory = Path(path)
    manifest, tensors = read_checkpoint(directory, verify=verify)
    where = directory / MANIFEST_FILE
    try:
        config = DBLLMConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as err:
        raise ArtifactError(f"{where}: invalid config: {err}") from None
    aliases: dict[str, str] = manifest["aliases"]
    if model is None:
        # Built on meta (no init cost), then given uninitialised CPU storage: export bakes the
        # weights' device into ops such as arange(device=...), so it must trace on the real one.
        model = build_skeleton(manifest["architecture"], device="meta", where=str(where))
        _cast_skeleton(model, manifest["tensors"], aliases)
        model = model.to_empty(device="cpu")
    fixed = dict(manifest.get("fixed_kwargs") or {})
    if example_inputs is None:
        if manifest.get("example_inputs") is None:
            raise ArtifactError(
                f"{where}: the model was exported with inputs that are not plain tensors, so the manifest "
                "has no example inputs; pass them: load_deployed(path, example_inputs=(...), example_kwargs={...})"
            )
        example_inputs, tensor_kwargs = make_example_inputs(manifest["example_inputs"])
        example_kwargs = {**tensor_kwargs, **fixed}
    example_kwargs = dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        gm, rebuilt = rebuild_structure(model, config, tuple(example_inputs), example_kwargs)
    finally:
        model.train(was_training)
    _check_layers(where, manifest["layers"], rebuilt)

    held = graph_tensors(gm)
    expected = set(manifest["tensors"]) | set(aliases)
    missing = sorted(set(held) - expected)
    unexpected = sorted(expected - set(held))
    if missing or unexpected:
        raise ArtifactError(
            f"{directory / WEIGHTS_FILE}: the rebuilt model holds tensors the artifact lacks ({missing[:5]}) "
            f"or the artifact has tensors the model does not hold ({unexpected[:5]}); the architecture "
            "differs from the one saved: pass the exact source architecture (model=...)"
        )
    for name, (placeholder, kind) in held.items():
        value = tensors[aliases.get(name, name)]
        if value.shape != placeholder.shape:
            raise ArtifactError(
                f"{directory / WEIGHTS_FILE}: tensor {name!r} is stored as {list(value.shape)}, the rebuilt model "
                f"expects {list(placeholder.shape)}; the architecture differs from the one saved"
            )
        _set_tensor(gm, name, value, kind)
    report_layers = [QuantizedLayer(**{k: d[k] for k in QuantizedLayer.__dataclass_fields__}) for d in manifest["layers"]]
    from dbllm_compile.passes.quantize_linears import PassReport
    from dbllm_compile.passes.linear_match import SkippedSite

    stored_report = manifest.get("report", {})
    report = PassReport(
        rewritten=report_layers,
        skipped=[SkippedSite(**s) for s in stored_report.get("skipped", [])],
        notes=list(stored_report.get("notes", [])),
    )
    return DBLLMModel(gm, config, report, stage="deploy", fixed_kwargs=fixed,
                      example_spec=manifest.get("example_inputs"), architecture=manifest["architecture"])


def apply_layers(model: DBLLMModel, path: str | os.PathLike) -> list[str]:
    """Copy the trained dual-binary layers of an artifact into a deployed model, in place.

    For deploying trained layers in another dtype or on another device than they were saved
    with: deploy the source model afresh (``convert(quantize(model_fp16, ...))`` with the same
    group size and codebook), then overwrite its bits and scales with the artifact's. The
    scales (and sign-codebook offsets) take the dtype and device of the tensors they replace;
    the packed bits must have the same shape. Everything that is not a dual-binary layer (norms,
    embeddings) is the model's own, so it must be the same source model the artifact came from.

    Returns:
        The weight names that were replaced (every layer of the artifact).

    Raises:
        ArtifactError: the model is not deployed, lacks a layer of the artifact, or a layer's
            shape, group size or codebook differs (named, with the fix).
    """
    from dbllm_compile.artifact.checkpoint import deploy_layer_tensors, load_layers
    from dbllm_compile.passes.linear_match import get_attr_value

    where = Path(path) / MANIFEST_FILE
    if getattr(model, "stage", None) != "deploy":
        raise ArtifactError(f"apply_layers({str(path)!r}): the model is not deployed (stage "
                            f"{getattr(model, 'stage', None)!r}); pass dbllm_compile.convert(model)")
    stored = load_layers(path)
    held = deploy_layer_tensors(model.graph_module)
    missing = sorted(set(stored) - set(held))
    if missing:
        raise ArtifactError(f"{where}: layers {missing[:3]} ({len(missing)} in all) are not dual-binary layers of "
                            "the model; quantize the same source model with the same include/exclude patterns")
    if stored and next(iter(stored.values()))[3] != model.config.group_size:
        raise ArtifactError(f"{where}: the artifact has group_size {next(iter(stored.values()))[3]}, the model "
                            f"{model.config.group_size}; quantize with DBLLMConfig(group_size=...) to match")
    gm = model.graph_module
    for weight, (packed, a1, a2, _group, c) in stored.items():
        names = held[weight]
        if (c is None) != ("c" not in names):
            raise ArtifactError(f"{where}: layer {weight!r} uses the {'sign' if c is not None else 'binary'} codebook, "
                                "the model the other; quantize with the artifact's codebook")
        for key, value in (("packed", packed), ("a1", a1), ("a2", a2), ("c", c)):
            if value is None:
                continue
            target = get_attr_value(gm, names[key])
            if tuple(target.shape) != tuple(value.shape):
                raise ArtifactError(f"{where}: layer {weight!r} tensor {key} is {list(value.shape)} in the artifact, "
                                    f"{list(target.shape)} in the model; the architecture differs")
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    return sorted(stored)
