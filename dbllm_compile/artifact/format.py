"""The dbllm artifact format: file names, the manifest, and its checks.

An artifact is a directory::

    model.safetensors   every tensor of the deployed graph module, tied tensors once: packed
                        planes uint8 [2, N, K_pad/8], scales a1/a2 [N, ceil(K/G)] (scale dtype),
                        the offsets c [N, ceil(K/G)] of sign-codebook layers (scale dtype),
                        and all non-quantized parameters, buffers (non-persistent ones too)
                        and tensor constants
    dbllm.json          the manifest (below)

Manifest keys (format version 3):

- ``format`` (``"dbllm_compile.deployed"``), ``format_version``, ``library_version``,
  ``torch_version``;
- ``config``: :meth:`DBLLMConfig.to_dict`;
- ``source_model``: identity of the files the model came from (:func:`dbllm_compile.models.
  model_identity`, may be empty); ``architecture``: class and Hugging Face config
  (:func:`~dbllm_compile.artifact.source.describe_architecture`);
- ``example_inputs`` and ``fixed_kwargs``: how to export the architecture again;
- ``layers``: one entry per dual-binary layer: ``name``, ``weight``, ``in_features``,
  ``out_features``, ``padded_in_features``, ``layout``, and the names of its ``packed``, ``a1``,
  ``a2`` tensors, plus ``c`` (the offset tensor) for a layer of the sign codebook
  (``config.codebook == "sign"``);
- ``tensors``: ``{name: {"dtype", "shape", "kind"}}`` of every stored tensor (kind
  ``parameter``, ``buffer`` or ``constant``); ``aliases``: ``{name: stored name}`` of tied ones;
- ``files``: ``{"model.safetensors": {"bytes", "sha256"}}``; ``size``: bytes on disk and bits per
  quantized weight; ``report``: skipped sites and notes of the quantization pass;
- ``manifest_sha256``: sha256 of the manifest itself without this key (canonical JSON: sorted
  keys, no spaces), so an edited manifest is detected like an edited weight file.

Version history: 1 (save only; no architecture, example inputs or tensor inventory: cannot be
loaded), 2 (loadable; {0,1} codebook only), 3 (this one: a layer may carry the offset ``c`` of
the sign codebook). Version 3 was needed because a version-2 reader would not know the offset:
:func:`~dbllm_compile.artifact.checkpoint.load_layers` of a version-2 reader would silently
return the layers without it. Version-2 artifacts still load (they are version 3 without
offsets, their config dict without ``codebook`` reads as ``"binary"``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dbllm_compile.errors import ArtifactError

__all__ = [
    "FORMAT_NAME",
    "ARTIFACT_VERSION",
    "OLDEST_LOADABLE_VERSION",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "sha256_file",
    "seal_manifest",
    "read_manifest",
    "verify_files",
]

FORMAT_NAME = "dbllm_compile.deployed"
ARTIFACT_VERSION = 3
OLDEST_LOADABLE_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "dbllm.json"

_REQUIRED_KEYS = ("config", "architecture", "layers", "tensors", "aliases", "files", "manifest_sha256")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical_sha256(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Normalise ``manifest`` to what JSON reads back and add ``manifest_sha256``."""
    manifest = json.loads(json.dumps(manifest, default=str))
    manifest["manifest_sha256"] = _canonical_sha256(manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``directory/dbllm.json``: JSON, format name, version, self-checksum.

    Raises:
        ArtifactError: naming the file and the problem (missing, corrupt, wrong version,
            edited after saving), and what to do.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory}: no such artifact directory (an artifact is a directory with "
            f"{WEIGHTS_FILE} and {MANIFEST_FILE}, written by dbllm_compile.artifact.save_deployed)"
        )
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; {directory} is not a dbllm_compile artifact (expected {WEIGHTS_FILE} + "
            f"{MANIFEST_FILE}, written by dbllm_compile.artifact.save_deployed)"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(
            f"{path}: corrupt manifest, not valid UTF-8 JSON ({err}); the file was damaged after "
            "saving: restore it or save the artifact again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: not a dbllm_compile manifest (format {got!r}, expected {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version!r} (written by dbllm_compile "
            f"{manifest.get('library_version', '?')}) is newer than this dbllm_compile reads "
            f"(version {ARTIFACT_VERSION}); upgrade dbllm_compile to load it"
        )
    if version < OLDEST_LOADABLE_VERSION:
        raise ArtifactError(
            f"{path}: format version {version} is too old to load (version 1 artifacts were save-only: "
            f"they lack the architecture, example inputs and tensor inventory); save the model again "
            f"with dbllm_compile >= 0.1.0 to get version {ARTIFACT_VERSION}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks {missing}; it is corrupt or was edited: save the artifact again")
    if manifest["manifest_sha256"] != _canonical_sha256(manifest):
        raise ArtifactError(
            f"{path}: manifest checksum mismatch: the manifest was edited or damaged after saving "
            "(tampered or corrupt); restore it or save the artifact again"
        )
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in ``manifest["files"]``: present, full size, same sha256.

    Raises:
        ArtifactError: naming the file: missing, truncated (fewer bytes than saved), of another
            size, or with other content than saved (corrupt or tampered).
    """
    directory = Path(directory)
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE}); copy the whole artifact directory")
        size = path.stat().st_size
        if size < info["bytes"]:
            raise ArtifactError(
                f"{path}: truncated: {size} of {info['bytes']} bytes (an interrupted copy or download?); "
                "copy the artifact again"
            )
        if size != info["bytes"]:
            raise ArtifactError(
                f"{path}: {size} bytes, but {MANIFEST_FILE} says {info['bytes']}: the file was modified "
                "after saving (tampered or corrupt); restore it or save the artifact again"
            )
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise ArtifactError(
                f"{path}: content does not match the sha256 in {MANIFEST_FILE} (got {digest[:16]}..., "
                f"expected {info['sha256'][:16]}...): the file is corrupt or was tampered with; restore "
                "it or save the artifact again"
            )
