"""Calibration data for distillation: written by the teacher itself, or cut from a corpus.

Data-free calibration (DB-LLM, following LLM-QAT): the full-precision teacher writes its own
training text. Every sequence starts from a random first token; the next ``greedy_steps`` tokens
are the teacher's top-1 choice (so the sequence settles into something the teacher finds likely);
every later token is sampled from ``softmax(logits / temperature)``, optionally restricted to the
nucleus of mass ``top_p``. Sequences always run to ``seq_len`` tokens (an end-of-sequence token is
kept like any other: the student must match the teacher there too).

Generation is batched and uses the teacher's KV cache (one token per forward call). All the
randomness is drawn up front from one CPU ``torch.Generator`` seeded with ``spec.seed``: the
first tokens, then one uniform number per (sequence, position). Sampling maps that number through
the inverse CDF of the next-token distribution (:func:`sample_from_logits`), so the same seed gives
the same data on CPU and on CUDA, whatever the batch size, up to the floating-point differences of
the teacher's own forward pass.

Generated data is cached on disk as ``<key>.safetensors`` (one int64 tensor ``input_ids``; the
description in the safetensors metadata as JSON), with ``key`` the SHA-256 of a canonical JSON of
the teacher's fingerprint, every :class:`CalibrationSpec` field but ``batch_size`` (which splits
the work and does not change the data), the set of allowed first tokens
and :data:`CALIBRATION_FORMAT_VERSION`. Changing the teacher's weights or any setting therefore
gives a new entry; a file that cannot be read back is reported (:class:`CalibrationCacheWarning`)
and regenerated. Files are written to a temporary name in the same directory and moved into place
with ``os.replace``, so a killed run never leaves a half-written entry.

Modules: :mod:`.spec` (:class:`CalibrationSpec`, :class:`CalibrationData`), :mod:`.generate`
(sampling and generation), :mod:`.cache` (fingerprints, keys, atomic cache entries),
:mod:`.corpus` (corpus data and mixes).

Example:
    >>> from dbllm_compile.models import load_model                       # doctest: +SKIP
    >>> teacher, tokenizer = load_model("smollm2-135m")                    # doctest: +SKIP
    >>> data = generate_calibration(teacher, CalibrationSpec(num_sequences=64, seq_len=256),
    ...                             tokenizer=tokenizer)                    # doctest: +SKIP
    >>> data.input_ids.shape, data.source                                  # doctest: +SKIP
    (torch.Size([64, 256]), 'generated')
    >>> corpus = corpus_calibration(tokenizer, open("wiki.train.raw").read(),
    ...                             CalibrationSpec(num_sequences=64, seq_len=256))  # doctest: +SKIP
    >>> mixed = mix_calibration(data, corpus, fraction_b=0.25, seed=0)     # doctest: +SKIP
"""

from dbllm_compile.distill.calibration.cache import (
    CALIBRATION_FORMAT_VERSION,
    CalibrationCacheWarning,
    calibration_cache_key,
    teacher_fingerprint,
)
from dbllm_compile.distill.calibration.corpus import corpus_calibration, mix_calibration
from dbllm_compile.distill.calibration.generate import (
    default_generation_batch,
    first_token_candidates,
    generate_calibration,
    sample_from_logits,
)
from dbllm_compile.distill.calibration.spec import CalibrationData, CalibrationSpec

__all__ = [
    "CALIBRATION_FORMAT_VERSION",
    "CalibrationCacheWarning",
    "CalibrationData",
    "CalibrationSpec",
    "calibration_cache_key",
    "corpus_calibration",
    "default_generation_batch",
    "first_token_candidates",
    "generate_calibration",
    "mix_calibration",
    "sample_from_logits",
    "teacher_fingerprint",
]
