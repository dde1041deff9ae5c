"""Perplexity evaluation of causal language models.

The protocol (:func:`perplexity`) is the usual one of low-bit LLM papers:

1. tokenize the *whole* text at once: ``tokenizer(text, return_tensors="pt").input_ids``
   (the tokenizer's default special-token handling, nothing more);
2. cut the ids into consecutive, non-overlapping windows of ``seq_len`` tokens, dropping the
   incomplete tail, and keep the first ``max_windows``;
3. run the model on each window (``model(input_ids)``) and sum the cross-entropy of
   ``logits[:, :-1]`` against ``ids[:, 1:]`` (``seq_len - 1`` predicted tokens per window);
4. ``perplexity = exp(total_nll / total_predicted_tokens)``.

Example:
    >>> from dbllm_compile.models import load_model          # doctest: +SKIP
    >>> from dbllm_compile.evaluate import load_eval_text, perplexity  # doctest: +SKIP
    >>> model, tok = load_model("smollm2-135m")              # doctest: +SKIP
    >>> text = load_eval_text("/work/shared/data/wikitext2/wiki.test.raw")  # doctest: +SKIP
    >>> perplexity(model, tok, text, seq_len=512, max_windows=40).perplexity  # doctest: +SKIP
    28.738...
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "PerplexityResult",
    "default_eval_text",
    "load_eval_text",
    "perplexity",
    "window_ids",
]

_LOSS_CHUNK_ELEMENTS = 1 << 24  # fp32 log-softmax over at most 16M logits (64 MiB) at a time


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token, in nats.
        tokens: number of predicted tokens, ``windows * (seq_len - 1)``.
        windows: number of windows evaluated.
        seq_len: tokens per window.
        seconds: wall-clock time of the whole call (tokenization included).

    Example:
        >>> r = PerplexityResult(perplexity=2.0, nll=math.log(2.0), tokens=10, windows=2, seq_len=6, seconds=0.1)
        >>> str(r)
        'perplexity 2.0000 (nll 0.6931, 10 tokens in 2 windows of 6, 0.1 s)'
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} (nll {self.nll:.4f}, {self.tokens} tokens in "
            f"{self.windows} windows of {self.seq_len}, {self.seconds:.1f} s)"
        )


# ----------------------------------------------------------------------------- texts


def default_eval_text() -> str:
    """English text that ships with every CPython: the pydoc help topics.

    It is the values of ``pydoc_data.topics.topics`` (the text behind ``help("if")`` and the
    other keyword/topic pages of the Python reference manual), sorted by topic name and joined
    with blank lines (``"\\n\\n"``), so it is identical for one Python version everywhere. It is
    about 465k characters (~113k SmolLM2 tokens) on Python 3.11.

    Example:
        >>> text = default_eval_text()
        >>> len(text) > 100_000 and "assert" in text
        True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip it out of their python packages
        raise RuntimeError(
            "pydoc_data.topics is missing from this Python installation, so there is no default "
            "evaluation text; pass text=load_eval_text(PATH) instead"
        ) from err
    return "\n\n".join(topics[key] for key in sorted(topics))


def load_eval_text(path: str | os.PathLike[str]) -> str:
    """Read an evaluation text file as UTF-8, with newlines normalised like ``open(path).read()``.

    ``"\\r\\n"`` and lone ``"\\r"`` become ``"\\n"`` (Python's universal-newline reading), so
    the result equals ``Path(path).read_text(encoding="utf-8")``. This matters for token
    counts: WikiText-2's ``wiki.test.raw`` has 2,891 CRLF line ends and gives 301,948
    SmolLM2 tokens read this way (304,839 if the ``"\\r"`` were kept).

    Raises:
        FileNotFoundError: the file does not exist (or is a directory).
        ValueError: the file is empty / whitespace only, or is not valid UTF-8 (the byte
            offset of the first bad byte is given).

    Example:
        >>> text = load_eval_text("/work/shared/data/wikitext2/wiki.test.raw")  # doctest: +SKIP
        >>> len(text)                                        # doctest: +SKIP
        1285622
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"evaluation text file {str(file)!r} does not exist; pass the path of a UTF-8 text file")
    if not file.is_file():
        raise FileNotFoundError(f"evaluation text path {str(file)!r} is not a regular file; pass the path of a UTF-8 text file")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"evaluation text file {str(file)!r} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}: {err.reason}); convert it, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None
    if not text.strip():
        raise ValueError(f"evaluation text file {str(file)!r} is empty ({len(data)} bytes, no text); pass a file with text in it")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------- tokens


def _as_ids(tokenizer_or_ids: Any, text: str | None) -> torch.Tensor:
    """The 1-D LongTensor of token ids to evaluate, from ids or from tokenizer + text."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if text is not None:
            raise ValueError("pass either pre-tokenized ids or a tokenizer and a text, not ids and a text")
        ids = tokenizer_or_ids
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(
                f"token ids must be 1-D or of shape [1, T], got shape {list(tokenizer_or_ids.shape)}; "
                "concatenate documents into one sequence first"
            )
        return ids.long()
    if not callable(tokenizer_or_ids):
        raise TypeError(
            f"expected a tokenizer (callable) or a LongTensor of ids, got {type(tokenizer_or_ids).__name__}"
        )
    if text is None:
        text = default_eval_text()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    encoded = tokenizer_or_ids(text, return_tensors="pt")
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded.input_ids
    return _as_ids(torch.as_tensor(ids), None)


def window_ids(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut 1-D ids into ``[windows, seq_len]``: consecutive, non-overlapping, tail dropped.

    Raises ``ValueError`` if there are fewer than ``seq_len`` tokens (naming both counts).

    Example:
        >>> window_ids(torch.arange(10), 3).tolist()
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        >>> window_ids(torch.arange(10), 3, max_windows=2).shape
        torch.Size([2, 3])
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one token predicted from another), got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None (all windows), got {max_windows!r}")
    total = ids.numel()
    windows = total // seq_len
    if windows == 0:
        raise ValueError(
            f"the text has {total} tokens, fewer than one window of seq_len={seq_len} needs; "
            f"use a longer text or a seq_len <= {total}"
        )
    if max_windows is not None:
        windows = min(windows, max_windows)
    return ids[: windows * seq_len].reshape(windows, seq_len)


# ----------------------------------------------------------------------------- model


def _logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``.logits``, ``["logits"]`` or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"model output of type {type(output).__name__} has no logits; the model must return a "
        "[batch, seq, vocab] tensor, an object with .logits, or a dict with 'logits'"
    )


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``, fp32 chunk by chunk."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"model returned logits of shape {list(logits.shape)} for input of shape {list(ids.shape)}; "
            "expected [batch, seq, vocab] with the same batch and seq"
        )
    vocab = logits.shape[-1]
    flat_logits = logits[:, :-1].reshape(-1, vocab)
    targets = ids[:, 1:].reshape(-1).to(logits.device)
    rows = max(1, _LOSS_CHUNK_ELEMENTS // vocab)
    total = 0.0
    for start in range(0, targets.numel(), rows):
        chunk = flat_logits[start : start + rows].float()
        total += F.cross_entropy(chunk, targets[start : start + rows], reduction="sum").item()
    return total


def _model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU if it has none)."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def perplexity(
    model: Any,
    tokenizer_or_ids: Any,
    text: str | None = None,
    *,
    seq_len: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with the protocol of the module docstring.

    Args:
        model: a causal LM called as ``model(input_ids)`` with ``input_ids`` of shape
            ``[batch, seq_len]``; it may return the logits tensor ``[batch, seq_len, vocab]``,
            an object with ``.logits`` (Hugging Face), a dict with ``"logits"``, or a tuple whose
            first item is the logits. An ``nn.Module`` is put in eval mode for the call and
            restored afterwards.
        tokenizer_or_ids: a tokenizer (called as ``tokenizer(text, return_tensors="pt")``),
            or pre-tokenized ids: an integer tensor of shape ``[T]`` or ``[1, T]`` (then
            ``text`` must be None).
        text: the text to evaluate; with a tokenizer, None means :func:`default_eval_text`.
        seq_len: tokens per window (>= 2); each window predicts ``seq_len - 1`` tokens.
        max_windows: evaluate only the first this-many windows; None for all.
        batch_size: windows per forward pass (the result does not depend on it, up to
            floating-point noise in the model itself).
        device: where to run; default the device of the model's first parameter.
        progress: show a tqdm progress bar (on stderr).
        desc: label of the progress bar.

    Raises:
        ValueError: fewer tokens than one window, bad ``seq_len``/``max_windows``/``batch_size``,
            ids of the wrong shape, or logits of the wrong shape.
        TypeError: wrong argument types, or a model output without logits.

    Example:
        >>> class Uniform(torch.nn.Module):                  # every token equally likely
        ...     def forward(self, ids):
        ...         return torch.zeros(*ids.shape, 50)
        >>> r = perplexity(Uniform(), torch.arange(100) % 50, seq_len=10, progress=False)
        >>> round(r.perplexity, 6), r.windows, r.tokens
        (50.0, 10, 90)
    """
    start_time = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ids = _as_ids(tokenizer_or_ids, text)
    windows = window_ids(ids, seq_len, max_windows)
    run_device = torch.device(device) if device is not None else _model_device(model)

    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        with torch.inference_mode(), tqdm(total=windows.shape[0], desc=desc, unit="win", disable=not progress) as bar:
            for first in range(0, windows.shape[0], batch_size):
                batch = windows[first : first + batch_size].to(run_device)
                total_nll += _nll_sum(_logits_of(model(batch)), batch)
                total_tokens += batch.shape[0] * (seq_len - 1)
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{_safe_exp(total_nll / total_tokens):.3f}")
    finally:
        if was_training:
            model.train()

    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=_safe_exp(mean_nll),
        nll=mean_nll,
        tokens=total_tokens,
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        seconds=time.perf_counter() - start_time,
    )


def _safe_exp(value: float) -> float:
    """``math.exp`` that gives ``inf`` instead of raising on overflow."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
