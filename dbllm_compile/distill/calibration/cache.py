"""The on-disk cache of generated calibration data: teacher fingerprints, keys, atomic entries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.distill.calibration.spec import CalibrationSpec

CALIBRATION_FORMAT_VERSION = 1
"""Version of the cache entry layout and of the generation procedure; part of every cache key."""

_METADATA_KEY = "dbllm_calibration"
_SAMPLED_ELEMENTS_PER_TENSOR = 16
_EXECUTION_FIELDS = ("batch_size",)  # CalibrationSpec fields that change how, not what (not in the key)


class CalibrationCacheWarning(UserWarning):
    """A cached calibration file could not be used (corrupt, truncated, or not what its name says);
    the data is regenerated."""



# ----------------------------------------------------------------------------- cache keys


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A cheap fingerprint of a model: its config and an exact checksum of its state.

    The config is ``config.to_json_string(use_diff=False)`` without ``transformers_version`` and
    ``_name_or_path`` (so a library upgrade or a moved checkpoint keeps the key). The state is the
    parameters and *persistent* buffers (what ``state_dict`` saves; buffers derived from the config,
    such as rotary ``inv_freq``, are left out: the device that computes them rounds them its own
    way). Each tensor contributes its name, shape and dtype, two integer checksums of its raw bits
    (:func:`_bit_checksums`) and the exact values of 16 elements at evenly spaced flat positions.

    Every number is exact and independent of the order of reduction, so the same weights give the
    same fingerprint on a CPU and on a GPU, with any thread count. (The first version's float64
    sum and L2 norm, rounded to 13 significant digits, were not: the norm of SmolLM2-135M's
    embedding came out 7.213984443064e+02 on an H100 and 7.213984442948e+02 on the CPU, so text
    generated on the GPU was never found by a CPU run; results.md 3.0h.) Any change of the
    weights changes the fingerprint in practice; it is not a cryptographic hash of every byte.

    Returns:
        a 64-character hex SHA-256.

    Example:
        >>> fp = teacher_fingerprint(torch.nn.Linear(4, 4))
        >>> len(fp)
        64
    """
    digest = hashlib.sha256()
    config = getattr(teacher, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config_dict = json.loads(config.to_json_string(use_diff=False))
        for volatile in ("transformers_version", "_name_or_path"):
            config_dict.pop(volatile, None)
        digest.update(json.dumps(config_dict, sort_keys=True).encode())
    else:
        digest.update(type(teacher).__qualname__.encode())
    with torch.no_grad():
        for name, tensor in _named_tensors(teacher):
            flat = tensor.detach().reshape(-1)
            line = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}"
            if flat.numel():
                plain, weighted = _bit_checksums(flat)
                line += f"|{plain}|{weighted}"
                if flat.is_floating_point() or flat.is_complex():
                    as_f64 = flat.to(torch.float64) if not flat.is_complex() else flat.abs().to(torch.float64)
                    # Integer spacing: a float32 linspace rounds past the end on tensors of > 2^24 elements.
                    steps = max(1, _SAMPLED_ELEMENTS_PER_TENSOR - 1)
                    index = torch.arange(_SAMPLED_ELEMENTS_PER_TENSOR, device=flat.device) * (flat.numel() - 1) // steps
                    line += "|" + ",".join(repr(v) for v in as_f64[index].tolist())
            digest.update(line.encode() + b"\n")
    return digest.hexdigest()


_CHECKSUM_CHUNK = 1 << 22
_CHECKSUM_MODULUS = 65521  # position weights 1..65521: with 16-bit words every product is < 2^32


def _bit_checksums(flat: torch.Tensor) -> tuple[int, int]:
    """``(sum of w, sum of w * (i mod 65521 + 1))`` over the tensor's raw bits as unsigned 16-bit
    words ``w`` at word positions ``i`` (bytes for 1-byte dtypes), in exact integer arithmetic.

    Chunks of 2^22 words keep every int64 partial sum below 2^54, and the chunks are added as Python
    integers, so the result does not depend on the device or the order of reduction. The
    position-weighted sum sees two elements swapped, which the plain sum does not.

    Example:
        >>> _bit_checksums(torch.tensor([1, 2], dtype=torch.uint8))
        (3, 5)
    """
    raw = flat.contiguous()
    if raw.is_complex():
        raw = torch.view_as_real(raw).reshape(-1)
    if raw.dtype == torch.bool:
        raw = raw.to(torch.uint8)
    if raw.element_size() == 1:
        words, offset = raw.view(torch.uint8), 0
    else:
        words, offset = raw.view(torch.int16), 1 << 15
    # Position weights of a chunk starting at word s: table[s % modulus:][:chunk length].
    table = torch.arange(min(words.numel(), _CHECKSUM_CHUNK) + _CHECKSUM_MODULUS, device=words.device, dtype=torch.int64)
    table = table.remainder_(_CHECKSUM_MODULUS).add_(1)
    plain = weighted = 0
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        chunk = words[start:start + _CHECKSUM_CHUNK].to(torch.int64).add_(offset)
        at = start % _CHECKSUM_MODULUS
        plain += int(chunk.sum())
        weighted += int(chunk.mul_(table[at:at + chunk.numel()]).sum())
    return plain, weighted


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by name (``state_dict``'s set); tied tensors once."""
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def calibration_cache_key(teacher_key: str, spec: CalibrationSpec, candidates: torch.Tensor) -> str:
    """SHA-256 of a canonical JSON of the teacher key, every spec field but ``batch_size``, the
    first-token candidate set and :data:`CALIBRATION_FORMAT_VERSION`.

    ``batch_size`` is how the work is split, not what is generated (all randomness is drawn up
    front per sequence and position), like the device and the KV cache: leaving it out lets a run
    whose default batch differs (it follows the free GPU memory) find the same file.

    Example:
        >>> c = torch.arange(10)
        >>> calibration_cache_key("t", CalibrationSpec(), c) == calibration_cache_key("t", CalibrationSpec(), c)
        True
        >>> calibration_cache_key("t", CalibrationSpec(), c) == calibration_cache_key("t", CalibrationSpec(seed=1), c)
        False
    """
    payload = {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "teacher_key": teacher_key,
        "spec": {k: v for k, v in spec.to_dict().items() if k not in _EXECUTION_FIELDS},
        "first_tokens_sha256": hashlib.sha256(
            json.dumps(candidates.tolist(), separators=(",", ":")).encode()
        ).hexdigest(),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ----------------------------------------------------------------------------- cache files


def _write_cache(path: Path, input_ids: torch.Tensor, meta: dict[str, Any]) -> None:
    """Write ``input_ids`` + ``meta`` to ``path`` atomically (temporary file + ``os.replace``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"input_ids": input_ids.contiguous()}, tmp_name, metadata={_METADATA_KEY: json.dumps(meta)})
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _read_cache(path: Path, key: str, spec: CalibrationSpec, vocab_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read and check a cache entry (safetensors, no pickle); ``ValueError`` says what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "input_ids" not in f.keys():
                raise ValueError("it has no tensor 'input_ids'")
            input_ids = f.get_tensor("input_ids")
    except SafetensorError as err:
        raise ValueError(f"it is not a readable safetensors file ({err})") from None
    try:
        meta = json.loads(metadata[_METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"its metadata entry {_METADATA_KEY!r} is missing or not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != CALIBRATION_FORMAT_VERSION:
        raise ValueError(
            f"its format version is {meta.get('format_version') if isinstance(meta, dict) else None!r}, "
            f"expected {CALIBRATION_FORMAT_VERSION}"
        )
    if meta.get("key") != key:
        raise ValueError(f"its recorded key {meta.get('key')!r} does not match its name")
    expected = (spec.num_sequences, spec.seq_len)
    if input_ids.dtype != torch.long or tuple(input_ids.shape) != expected:
        raise ValueError(f"input_ids is {input_ids.dtype} {tuple(input_ids.shape)}, expected int64 {expected}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids has ids outside [0, {vocab_size})")
    return input_ids, meta
