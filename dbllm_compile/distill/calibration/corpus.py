"""Calibration data cut from a user corpus, and mixes of two data sets."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import torch

from dbllm_compile.errors import ConfigError
from dbllm_compile.distill.calibration.cache import CALIBRATION_FORMAT_VERSION
from dbllm_compile.distill.calibration.spec import CalibrationData, CalibrationSpec


logger = logging.getLogger(__name__)



def corpus_calibration(tokenizer: Any, text: str, spec: CalibrationSpec | None = None) -> CalibrationData:
    """Cut calibration sequences from a user corpus.

    The text is tokenized once (``tokenizer(text, return_tensors="pt").input_ids``, the
    tokenizer's default special-token handling, as in :func:`dbllm_compile.evaluate.perplexity`)
    and cut into ``spec.num_sequences`` consecutive, non-overlapping windows of ``spec.seq_len``
    tokens from the start. Only ``num_sequences`` and ``seq_len`` of the spec are used.

    Raises:
        ConfigError: the text has fewer than ``num_sequences * seq_len`` tokens.

    Example:
        >>> class Chars:                          # a toy tokenizer: one token per character
        ...     def __call__(self, text, return_tensors=None):
        ...         return type("E", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()
        >>> d = corpus_calibration(Chars(), "abcdefgh", CalibrationSpec(num_sequences=2, seq_len=3))
        >>> d.input_ids.tolist()
        [[97, 98, 99], [100, 101, 102]]
    """
    spec = CalibrationSpec() if spec is None else spec
    started = time.perf_counter()
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt").input_ids).reshape(-1).long()
    needed = spec.num_sequences * spec.seq_len
    if ids.numel() < needed:
        raise ConfigError(
            f"the corpus has {ids.numel()} tokens but {spec.num_sequences} sequences of {spec.seq_len} "
            f"tokens need {needed}; pass a longer text, or lower CalibrationSpec.num_sequences to "
            f"{max(ids.numel() // spec.seq_len, 0)} or seq_len"
        )
    input_ids = ids[:needed].reshape(spec.num_sequences, spec.seq_len).clone()
    seconds = time.perf_counter() - started
    meta = {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "source": "corpus",
        "spec": spec.to_dict(),
        "tokens": needed,
        "corpus_tokens": ids.numel(),
        "corpus_chars": len(text),
        "corpus_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        "seconds": seconds,
    }
    logger.info(
        "calibration data: %d x %d tokens cut from a corpus of %d tokens in %.1f s",
        spec.num_sequences, spec.seq_len, ids.numel(), seconds,
    )
    return CalibrationData(input_ids=input_ids, source="corpus", tokens=needed, seconds=seconds, meta=meta)


def mix_calibration(
    a: CalibrationData, b: CalibrationData, fraction_b: float, seed: int = 0, *, num_sequences: int | None = None
) -> CalibrationData:
    """Mix two calibration sets: ``round(fraction_b * n)`` rows from ``b``, the rest from ``a``.

    ``n`` is ``num_sequences`` (default: ``a.num_sequences``). Rows are drawn without
    replacement from each set and the result is shuffled, both with a ``torch.Generator``
    seeded with ``seed``.

    Raises:
        ConfigError: ``fraction_b`` outside [0, 1], different ``seq_len``, or a set with fewer
            rows than asked of it.

    Example:
        >>> a = CalibrationData(torch.zeros(4, 3, dtype=torch.long), source="generated", tokens=12, seconds=0.0)
        >>> b = CalibrationData(torch.ones(4, 3, dtype=torch.long), source="corpus", tokens=12, seconds=0.0)
        >>> m = mix_calibration(a, b, fraction_b=0.25, seed=0)
        >>> m.source, int(m.input_ids[:, 0].sum())
        ('mixed', 1)
    """
    if isinstance(fraction_b, bool) or not isinstance(fraction_b, (int, float)) or not 0.0 <= fraction_b <= 1.0:
        raise ConfigError(f"mix_calibration: fraction_b must be a float in [0, 1], got {fraction_b!r}")
    if a.seq_len != b.seq_len:
        raise ConfigError(
            f"mix_calibration: the two sets have different seq_len ({a.seq_len} and {b.seq_len}); "
            f"build both with the same CalibrationSpec.seq_len"
        )
    n = a.num_sequences if num_sequences is None else num_sequences
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"mix_calibration: num_sequences must be an int >= 1, got {n!r}")
    rows_b = round(fraction_b * n)
    rows_a = n - rows_b
    for label, data, rows in (("a", a, rows_a), ("b", b, rows_b)):
        if rows > data.num_sequences:
            raise ConfigError(
                f"mix_calibration: {rows} rows are needed from {label} but it has {data.num_sequences}; "
                f"give {label} more sequences, or change fraction_b or num_sequences"
            )
    generator = torch.Generator().manual_seed(seed)
    pick_a = torch.randperm(a.num_sequences, generator=generator)[:rows_a]
    pick_b = torch.randperm(b.num_sequences, generator=generator)[:rows_b]
    rows = torch.cat([a.input_ids.cpu()[pick_a], b.input_ids.cpu()[pick_b]])
    input_ids = rows[torch.randperm(n, generator=generator)]
    meta = {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "source": "mixed",
        "fraction_b": float(fraction_b),
        "seed": seed,
        "rows_from_a": rows_a,
        "rows_from_b": rows_b,
        "a": {"source": a.source, "cache_path": str(a.cache_path) if a.cache_path else None, "meta": a.meta},
        "b": {"source": b.source, "cache_path": str(b.cache_path) if b.cache_path else None, "meta": b.meta},
        "tokens": input_ids.numel(),
    }
    return CalibrationData(
        input_ids=input_ids, source="mixed", tokens=input_ids.numel(), seconds=a.seconds + b.seconds, meta=meta,
    )
