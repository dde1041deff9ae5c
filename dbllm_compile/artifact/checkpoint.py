"""Save a deployed model as a dbllm artifact, and read an artifact's tensors back (no pickle).

The format is documented in :mod:`dbllm_compile.artifact.format`; rebuilding a runnable model
from it is :func:`dbllm_compile.artifact.rebuild.load_deployed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.artifact.atomic import atomic_directory
from dbllm_compile.artifact.format import (
    ARTIFACT_VERSION,
    FORMAT_NAME,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    read_manifest,
    seal_manifest,
    sha256_file,
    verify_files,
)
from dbllm_compile.errors import ArtifactError
from dbllm_compile.passes.linear_match import get_attr_value

__all__ = ["ARTIFACT_VERSION", "ArtifactInfo", "graph_tensors", "deploy_layer_tensors", "save_deployed", "read_checkpoint",
           "artifact_info", "load_layers"]


@dataclass(frozen=True)
class ArtifactInfo:
    """Size of an artifact on disk.

    Attributes:
        path: the artifact directory.
        bytes_on_disk: all files of the artifact.
        quantized_weights: weights held as dual-binary.
        quantized_bytes: their packed bits plus scales (and offsets).
        bits_per_weight: ``8 * quantized_bytes / quantized_weights`` (2.5 for G=64, fp16 scales;
            2.75 with the offsets of the sign codebook).
        layers: number of dual-binary layers.
    """

    path: Path
    bytes_on_disk: int
    quantized_weights: int
    quantized_bytes: int
    bits_per_weight: float
    layers: int

    def summary(self) -> str:
        return (f"{self.path}: {self.bytes_on_disk / 1e6:.2f} MB on disk, {self.layers} dual-binary layers, "
                f"{self.quantized_weights:,} quantized weights at {self.bits_per_weight:.3f} bits/weight")


def graph_tensors(gm: torch.nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor ``gm`` holds, by qualified name: ``{name: (tensor, kind)}``.

    ``kind`` is ``"parameter"``, ``"buffer"`` (persistent or not) or ``"constant"`` (a plain
    tensor attribute read by a ``get_attr`` node, e.g. a lifted constant of torch.export). Tied
    tensors appear under each of their names.
    """
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        out[name] = (p, "parameter")
    for name, b in gm.named_buffers(remove_duplicate=False):
        out.setdefault(name, (b, "buffer"))
    graph = getattr(gm, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "get_attr" and node.target not in out:
            value = get_attr_value(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node.target] = (value, "constant")
    return out


def deploy_layer_tensors(gm: torch.fx.GraphModule) -> dict[str, dict[str, str]]:
    """``{weight name: {"packed": ..., "a1": ..., "a2": ...}}``: the attribute names each
    ``dbllm.db_linear`` node reads, keyed by the latent weight they replaced; a node of the sign
    codebook adds ``"c"`` (its offset)."""
    from dbllm_compile.ops import DEPLOY_OP, op_arguments

    out: dict[str, dict[str, str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == DEPLOY_OP:
            args = op_arguments(node)
            names = {key: args[key].target for key in ("packed", "a1", "a2", "c") if args[key] is not None}
            out[names["packed"].removesuffix("_packed")] = names
    return out


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_deployed(model: DBLLMModel, out_dir: str | os.PathLike, *, source: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write a deployed (converted) model to ``out_dir`` atomically; returns the path.

    Args:
        model: the output of :func:`dbllm_compile.convert`.
        out_dir: the artifact directory (replaced if it exists, atomically).
        source: identity of the source files (e.g. :func:`dbllm_compile.models.model_identity`).
        extra: more JSON-serialisable top-level manifest entries (e.g. evaluation results).

    Example:
        >>> # deployed = dbllm_compile.convert(qmodel); save_deployed(deployed, "out/")
        >>> # load_deployed("out/")(ids)   # in any process, no original weights needed
    """
    from safetensors.torch import save_file

    import dbllm_compile

    if not isinstance(model, DBLLMModel) or model.stage != "deploy":
        raise ArtifactError(
            f"save_deployed() takes the output of convert(), got "
            f"{getattr(model, 'stage', type(model).__name__)!r}; call dbllm_compile.convert(qmodel) first"
        )
    out = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    inventory: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, (t, kind) in graph_tensors(model.graph_module).items():
        if t.device.type == "meta":
            raise ArtifactError(f"save_deployed(): tensor {name!r} is on the meta device (has no data); load real weights first")
        key = _storage_key(t)
        if key is not None and key in first_name:
            aliases[name] = first_name[key]
            continue
        if key is not None:
            first_name[key] = name
        tensors[name] = t.detach().contiguous().cpu()
        inventory[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "kind": kind}
    by_weight = deploy_layer_tensors(model.graph_module)
    layers = []
    for layer in model.report.rewritten:
        if layer.weight not in by_weight:
            raise ArtifactError(f"save_deployed(): layer {layer.name!r} has no dual-binary node in the graph module")
        layers.append({**vars(layer), **by_weight[layer.weight]})
    size = model.size_report()
    with atomic_directory(out) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": FORMAT_NAME, "format_version": str(ARTIFACT_VERSION)})
        bytes_on_disk = weights.stat().st_size
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": ARTIFACT_VERSION,
            "library_version": dbllm_compile.__version__,
            "torch_version": torch.__version__,
            "config": model.config.to_dict(),
            "source_model": source or {},
            "architecture": model.architecture or {},
            "example_inputs": model.example_spec,
            "fixed_kwargs": model.fixed_kwargs,
            "layers": layers,
            "tensors": inventory,
            "aliases": aliases,
            "files": {WEIGHTS_FILE: {"bytes": bytes_on_disk, "sha256": sha256_file(weights)}},
            "size": {
                "weights_file_bytes": bytes_on_disk,
                "total_tensor_bytes": size.total_bytes,
                "quantized_weights": size.quantized_weights,
                "quantized_bytes": size.quantized_bytes,
                "bits_per_weight": size.bits_per_weight,
            },
            "report": {k: v for k, v in model.report.to_dict().items() if k in ("skipped", "notes")},
        }
        clash = sorted(set(extra or {}) & set(manifest))
        if clash:
            raise ArtifactError(f"save_deployed(extra=...): keys {clash} are reserved by the manifest; rename them")
        manifest.update(extra or {})
        import json

        (tmp / MANIFEST_FILE).write_text(json.dumps(seal_manifest(manifest), indent=2))
    return out


def read_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an artifact's manifest and tensors with safetensors and json only (never pickle).

    With ``verify`` (the default) the manifest version and self-checksum, the size and sha256 of
    ``model.safetensors``, and the tensor inventory (names, dtypes, shapes) are all checked.

    Returns:
        ``(manifest, tensors)`` with ``tensors`` the stored (de-duplicated) tensors on CPU.

    Raises:
        ArtifactError: naming the file and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err}); the file is corrupt: save the artifact again") from None
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: tensors do not match {MANIFEST_FILE} (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "the files come from different saves: copy the artifact directory as a whole"
        )
    for name, info in expected.items():
        t = tensors[name]
        if _dtype_name(t.dtype) != info["dtype"] or list(t.shape) != info["shape"]:
            raise ArtifactError(
                f"{path}: tensor {name!r} is {_dtype_name(t.dtype)} {list(t.shape)}, but {MANIFEST_FILE} says "
                f"{info['dtype']} {info['shape']}; the files come from different saves"
            )
    return manifest, tensors


def artifact_info(directory: str | os.PathLike) -> ArtifactInfo:
    """Size on disk and bits per weight of an artifact (reads the manifest only).

    Example:
        >>> # print(artifact_info("dbllm-out").summary())
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    size = manifest.get("size", {})
    on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return ArtifactInfo(
        path=directory,
        bytes_on_disk=on_disk,
        quantized_weights=int(size.get("quantized_weights", 0)),
        quantized_bytes=int(size.get("quantized_bytes", 0)),
        bits_per_weight=float(size.get("bits_per_weight", float("nan"))),
        layers=len(manifest["layers"]),
    )


def load_layers(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None]]:
    """The trained dual-binary layers of an artifact: ``{weight name: (packed, a1, a2, group_size, c)}``.

    Weight names are those of the source model's weight parameters
    (``model.layers.0.self_attn.q_proj.weight``); ``packed`` is ``uint8 [2, N, K_pad/8]`` in the
    reference layout, ``a1``/``a2`` the stored scales ``[N, ceil(K/G)]`` and ``c`` the stored
    offset of the sign codebook (same shape) or ``None``. This is what
    ``torch.compile(model, backend="dbllm", options={"artifact": path})`` uses instead of
    quantizing on the fly. Read with :func:`read_checkpoint` (checksums verified, no pickle).

    Raises:
        ArtifactError: naming the file and the problem.
    """
    manifest, tensors = read_checkpoint(directory)
    aliases = manifest.get("aliases", {})
    group_size = int(manifest["config"]["group_size"])

    def tensor(name: str) -> torch.Tensor:
        stored = aliases.get(name, name)
        if stored not in tensors:
            raise ArtifactError(f"{Path(directory) / MANIFEST_FILE}: layer tensor {name!r} is not in {WEIGHTS_FILE}; "
                                "the artifact is incomplete: save it again")
        return tensors[stored]

    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None]] = {}
    for layer in manifest["layers"]:
        offset = tensor(layer["c"]) if layer.get("c") else None
        out[layer["weight"]] = (tensor(layer["packed"]), tensor(layer["a1"]), tensor(layer["a2"]), group_size, offset)
    return out
