"""Data-free calibration: the teacher writes its own text (batched, KV cache, seeded sampling)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dbllm_compile.errors import ConfigError
from dbllm_compile.distill.calibration.cache import CALIBRATION_FORMAT_VERSION, CalibrationCacheWarning, _read_cache, _write_cache, calibration_cache_key, teacher_fingerprint
from dbllm_compile.distill.calibration.spec import CalibrationData, CalibrationSpec


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sampling


def sample_from_logits(
    logits: torch.Tensor, uniform: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling with given uniform numbers.

    ``p = softmax(logits / temperature)`` in float32. With ``top_p < 1`` the tokens are sorted by
    decreasing probability (stable sort: ties in id order) and only the prefix whose mass *before*
    each token is below ``top_p`` is kept (at least the top-1). The token returned for row ``i`` is
    the first (in that order; id order when ``top_p == 1``) whose float64 cumulative mass exceeds
    ``uniform[i] * total``. A token of probability 0 is never returned.

    Args:
        logits: ``[B, V]`` next-token logits, any float dtype.
        uniform: ``[B]`` numbers in ``[0, 1)``, one per row.
        temperature: > 0.
        top_p: in (0, 1].

    Returns:
        int64 ``[B]`` token ids, on ``logits.device``.

    Example:
        >>> logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
        >>> [sample_from_logits(logits, torch.tensor([u])).item() for u in (0.1, 0.6, 0.9)]
        [0, 1, 2]
        >>> sample_from_logits(logits, torch.tensor([0.9]), top_p=0.5).item()
        0
    """
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = probs.double().cumsum(dim=-1) - probs.double()
        probs = torch.where(mass_before < top_p, probs, torch.zeros_like(probs))
    else:
        order = None
    cdf = probs.double().cumsum(dim=-1)
    target = uniform.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    position = torch.searchsorted(cdf, target, right=True)
    # Guard against target == total through rounding: fall back to the last token of nonzero mass.
    last_nonzero = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    position = torch.minimum(position, last_nonzero)
    if order is not None:
        position = order.gather(-1, position)
    return position.squeeze(-1)


def first_token_candidates(
    vocab_size: int,
    *,
    tokenizer: Any = None,
    token_range: tuple[int, int] | None = None,
    special_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The ids a random first token is drawn from, sorted.

    ``range(vocab_size)`` (cut to ``len(tokenizer)`` when a tokenizer is given: ids past it are
    padding rows of the embedding), restricted to ``token_range`` if given, minus the tokenizer's
    ``all_special_ids`` and ``special_ids`` (e.g. the model config's bos/eos/pad ids).

    Example:
        >>> first_token_candidates(8, special_ids=(0, 7)).tolist()
        [1, 2, 3, 4, 5, 6]
        >>> first_token_candidates(8, token_range=(2, 5)).tolist()
        [2, 3, 4]
    """
    limit = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
    lo, hi = (0, limit) if token_range is None else token_range
    if hi > limit:
        raise ConfigError(
            f"CalibrationSpec.first_token_range {token_range!r} reaches past the vocabulary "
            f"({limit} ids); use hi <= {limit} or None"
        )
    excluded = {int(i) for i in special_ids if i is not None}
    if tokenizer is not None:
        excluded |= {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    ids = torch.arange(lo, hi, dtype=torch.long)
    if excluded:
        ids = ids[~torch.isin(ids, torch.tensor(sorted(excluded), dtype=torch.long))]
    if ids.numel() == 0:
        raise ConfigError(
            f"no first-token candidates left in ids [{lo}, {hi}) after removing the special tokens "
            f"{sorted(excluded)}; widen CalibrationSpec.first_token_range"
        )
    return ids





# ----------------------------------------------------------------------------- generation


def _vocab_size(teacher: torch.nn.Module) -> int:
    embeddings = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if vocab is None:
        raise ConfigError(
            f"cannot find the vocabulary size of {type(teacher).__name__}: it has neither "
            f"get_input_embeddings() nor config.vocab_size; pass a Hugging Face causal LM"
        )
    return int(vocab)


def _default_device(teacher: torch.nn.Module) -> torch.device:
    embeddings = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(iter(teacher.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _config_special_ids(teacher: torch.nn.Module) -> list[int]:
    config = getattr(teacher, "config", None)
    out: list[int] = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, int))
    return out


def default_generation_batch(teacher: torch.nn.Module, seq_len: int, *, cap: int = 1024,
                             memory_fraction: float = 0.5) -> int:
    """Sequences to generate together: 64 off CUDA; on CUDA the largest power of two up to ``cap``
    whose KV caches and sampling buffers fit in ``memory_fraction`` of the free GPU memory.

    Per sequence: ``layers x 2 x kv_heads x head_dim x seq_len`` cache entries in the teacher's
    dtype (from ``teacher.config``; 32 x 2 x 4,096 when the config does not say), plus ~24 bytes
    per vocabulary entry for the logits' float32 softmax, sort and float64 cumulative sum. The
    batch only changes the speed, never the data (module docstring). On the H100 with the float32
    SmolLM2-135M teacher (24 MB per 512-token sequence) it gives 1,024: 4,096 x 512 tokens in 176 s,
    against 133 s for a quarter of that at 128 (docs/results.md 3.0g).
    """
    device = _default_device(teacher)
    if device.type != "cuda":
        return 64
    config = getattr(teacher, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 32) or 32)
    heads = int(getattr(config, "num_attention_heads", 32) or 32)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", 4096) or 4096)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    first = next(iter(teacher.parameters()), None)
    itemsize = first.element_size() if first is not None else 4
    per_sequence = layers * 2 * kv_heads * head_dim * seq_len * itemsize + 24 * _vocab_size(teacher)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(memory_fraction * free // max(per_sequence, 1))
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _generate_batch(
    teacher: torch.nn.Module,
    first: torch.Tensor,
    uniform: torch.Tensor,
    spec: CalibrationSpec,
    *,
    kv_cache: bool,
    on_step: Any,
) -> torch.Tensor:
    """Generate ``[b, seq_len]`` ids from the first tokens ``[b]`` with per-position uniforms ``[b, seq_len]``."""
    ids = torch.empty(first.shape[0], spec.seq_len, dtype=torch.long, device=first.device)
    ids[:, 0] = first
    past = None
    for t in range(1, spec.seq_len):
        if kv_cache:
            out = teacher(input_ids=ids[:, t - 1 : t], past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = teacher(input_ids=ids[:, :t], use_cache=False)
        logits = out.logits[:, -1, :]
        if t <= spec.greedy_steps:
            ids[:, t] = logits.argmax(dim=-1)
        else:
            ids[:, t] = sample_from_logits(logits, uniform[:, t], temperature=spec.temperature, top_p=spec.top_p)
        on_step(first.shape[0])
    return ids


def generate_calibration(
    teacher: torch.nn.Module,
    spec: CalibrationSpec | None = None,
    *,
    tokenizer: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    teacher_key: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    cache: bool = True,
    kv_cache: bool = True,
) -> CalibrationData:
    """Let ``teacher`` write ``spec.num_sequences`` sequences of ``spec.seq_len`` tokens, or load
    them from the on-disk cache.

    See the module docstring for the procedure and the cache. The returned ``input_ids`` live on
    the CPU and are ordinary (not inference-mode) tensors.

    Args:
        teacher: a Hugging Face causal LM (called as ``teacher(input_ids=..., past_key_values=...,
            use_cache=True)``, reading ``.logits``). Put in eval mode for the call, then restored.
        spec: the settings; ``CalibrationSpec()`` by default.
        tokenizer: if given, its special tokens (and ids past ``len(tokenizer)``) are never drawn
            as first tokens. The model config's bos/eos/pad ids are excluded in any case.
        cache_dir: directory of the cache; ``dbllm_compile.models.cache_root() / "calibration"``
            by default.
        teacher_key: identity of the teacher in the cache key; :func:`teacher_fingerprint` by
            default. Pass your own (e.g. a checkpoint hash) to skip the fingerprint.
        device: where the inputs are created; the device of the teacher's input embeddings by
            default. The teacher is not moved.
        progress: show a tqdm progress bar (tokens).
        cache: read and write the on-disk cache; ``False`` always generates and writes nothing.
        kv_cache: feed one token per step with the teacher's KV cache (``True``), or re-run the
            whole prefix every step (``False``: slow, for models without a cache). Not part of
            the cache key, like ``device`` and ``spec.batch_size``: all give the same data up to
            rounding.

    Returns:
        :class:`CalibrationData` with ``source="generated"``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=50)).eval()
        >>> data = generate_calibration(teacher, CalibrationSpec(num_sequences=4, seq_len=8),
        ...                             cache=False, progress=False)
        >>> data.input_ids.shape
        torch.Size([4, 8])
    """
    spec = CalibrationSpec() if spec is None else spec
    if not isinstance(spec, CalibrationSpec):
        raise ConfigError(f"spec must be a CalibrationSpec, got {type(spec).__name__}")
    vocab_size = _vocab_size(teacher)
    candidates = first_token_candidates(
        vocab_size, tokenizer=tokenizer, token_range=spec.first_token_range,
        special_ids=_config_special_ids(teacher),
    )
    max_positions = getattr(getattr(teacher, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and spec.seq_len > max_positions:
        logger.warning(
            "CalibrationSpec.seq_len %d exceeds the teacher's max_position_embeddings %d; "
            "the tail of each sequence may be of low quality", spec.seq_len, max_positions,
        )

    path: Path | None = None
    key: str | None = None
    if cache:
        if teacher_key is None:
            started = time.perf_counter()
            teacher_key = teacher_fingerprint(teacher)
            logger.debug("teacher fingerprint %s in %.2f s", teacher_key[:12], time.perf_counter() - started)
        key = calibration_cache_key(teacher_key, spec, candidates)
        if cache_dir is None:
            from dbllm_compile.models import cache_root

            cache_dir = cache_root() / "calibration"
        path = Path(cache_dir).expanduser() / f"{key}.safetensors"
        if path.is_file():
            try:
                input_ids, meta = _read_cache(path, key, spec, vocab_size)
            except (ValueError, OSError) as err:
                message = f"calibration cache file {path} is unusable: {err}; regenerating it"
                warnings.warn(message, CalibrationCacheWarning, stacklevel=2)
                logger.warning(message)
            else:
                logger.info(
                    "calibration data: %d x %d tokens loaded from %s (generated in %.1f s)",
                    spec.num_sequences, spec.seq_len, path, meta.get("seconds", float("nan")),
                )
                return CalibrationData(
                    input_ids=input_ids, source="generated", tokens=input_ids.numel(), seconds=0.0,
                    cache_path=path, from_cache=True, meta=meta,
                )

    device = _default_device(teacher) if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(spec.seed)
    first_tokens = candidates[torch.randint(candidates.numel(), (spec.num_sequences,), generator=generator)]
    uniforms = torch.rand(spec.num_sequences, spec.seq_len, generator=generator, dtype=torch.float64)

    from tqdm.auto import tqdm

    started = time.perf_counter()
    batches: list[torch.Tensor] = []
    with (
        _eval_mode(teacher),
        torch.inference_mode(),
        tqdm(
            total=spec.num_sequences * (spec.seq_len - 1), desc="calibration", unit="tok",
            unit_scale=True, disable=not progress,
        ) as bar,
    ):
        for start in range(0, spec.num_sequences, spec.batch_size):
            stop = min(start + spec.batch_size, spec.num_sequences)
            ids = _generate_batch(
                teacher, first_tokens[start:stop].to(device), uniforms[start:stop].to(device), spec,
                kv_cache=kv_cache, on_step=bar.update,
            )
            batches.append(ids.cpu())
    # Outside inference mode: an ordinary tensor, usable as input of a model that trains.
    input_ids = torch.cat(batches).clone()
    seconds = time.perf_counter() - started
    generated = spec.num_sequences * (spec.seq_len - 1)
    logger.info(
        "calibration data: %d x %d tokens generated (%d teacher tokens) in %.1f s, %.0f tok/s on %s",
        spec.num_sequences, spec.seq_len, generated, seconds, generated / max(seconds, 1e-9), device,
    )

    meta: dict[str, Any] = {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "key": key,
        "teacher_key": teacher_key,
        "teacher_class": type(teacher).__name__,
        "spec": spec.to_dict(),
        "source": "generated",
        "tokens": input_ids.numel(),
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / max(seconds, 1e-9),
        "first_token_candidates": candidates.numel(),
        "device": str(device),
        "kv_cache": kv_cache,
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if path is not None:
        try:
            _write_cache(path, input_ids, meta)
        except OSError as err:
            message = f"could not write the calibration cache file {path} ({err}); continuing without it"
            warnings.warn(message, CalibrationCacheWarning, stacklevel=2)
            logger.warning(message)
            path = None
        else:
            logger.info("calibration data cached at %s", path)
    return CalibrationData(
        input_ids=input_ids, source="generated", tokens=input_ids.numel(), seconds=seconds,
        cache_path=path, from_cache=False, meta=meta,
    )


# ----------------------------------------------------------------------------- corpus and mix
