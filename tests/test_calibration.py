"""Data-free calibration data: generation, sampling, on-disk cache, corpus and mix."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dbllm_compile.distill.calibration import (
    CALIBRATION_FORMAT_VERSION,
    CalibrationCacheWarning,
    CalibrationData,
    CalibrationSpec,
    calibration_cache_key,
    corpus_calibration,
    first_token_candidates,
    generate_calibration,
    mix_calibration,
    sample_from_logits,
    teacher_fingerprint,
)
from dbllm_compile.errors import ConfigError

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread; two threads on a busy 2-core machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = CalibrationSpec(num_sequences=4, seq_len=8, greedy_steps=2, batch_size=4, seed=0)


def _count_calls(model: torch.nn.Module) -> list[int]:
    """Wrap ``model.forward`` so that every call is counted; returns the counter."""
    calls = [0]
    original = model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    model.forward = counted
    return calls


def _argmax_continuation(model: torch.nn.Module, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full forward passes on the whole prefix (no KV cache)."""
    ids = prefix.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


# ----------------------------------------------------------------------------- generation


def test_shapes_dtype_and_report(tiny_llama):
    data = generate_calibration(tiny_llama, SMALL, cache=False, progress=False)
    assert data.input_ids.shape == (4, 8)
    assert data.input_ids.dtype == torch.long and data.input_ids.device.type == "cpu"
    assert not data.input_ids.is_inference()  # usable as input of a model that trains
    assert 0 <= int(data.input_ids.min()) and int(data.input_ids.max()) < 128
    assert data.source == "generated" and data.tokens == 32 and data.seconds > 0
    assert data.from_cache is False and data.cache_path is None
    assert data.meta["generated_tokens"] == 4 * 7 and data.meta["spec"] == SMALL.to_dict()
    assert "32 tokens" in str(data)
    assert tiny_llama.training is False


def test_greedy_steps_are_the_teachers_argmax(tiny_llama):
    data = generate_calibration(tiny_llama, SMALL, cache=False, progress=False)
    expected = _argmax_continuation(tiny_llama, data.input_ids[:, :1], SMALL.greedy_steps)
    torch.testing.assert_close(data.input_ids[:, : 1 + SMALL.greedy_steps], expected, rtol=0, atol=0)


def test_first_tokens_avoid_special_ids(tiny_llama):
    tiny_llama.config.bos_token_id, tiny_llama.config.eos_token_id = 1, 2
    spec = dataclasses.replace(SMALL, num_sequences=64, seq_len=2, batch_size=64)
    data = generate_calibration(tiny_llama, spec, cache=False, progress=False)
    assert not torch.isin(data.input_ids[:, 0], torch.tensor([1, 2])).any()
    ranged = dataclasses.replace(spec, first_token_range=(10, 14))
    first = generate_calibration(tiny_llama, ranged, cache=False, progress=False).input_ids[:, 0]
    assert set(first.tolist()) <= {10, 11, 12, 13}


@pytest.mark.parametrize("seq_len", [2, 7], ids=["seq2", "seq7"])
def test_kv_cache_equals_full_prefix_for_greedy(tiny_llama, seq_len):
    spec = dataclasses.replace(SMALL, seq_len=seq_len, greedy_steps=seq_len)
    cached = generate_calibration(tiny_llama, spec, cache=False, progress=False)
    uncached = generate_calibration(tiny_llama, spec, cache=False, progress=False, kv_cache=False)
    assert torch.equal(cached.input_ids, uncached.input_ids)
    assert torch.equal(cached.input_ids, _argmax_continuation(tiny_llama, cached.input_ids[:, :1], seq_len - 1))


def test_reproducible_with_seed_and_batch_size(tiny_llama):
    a = generate_calibration(tiny_llama, SMALL, cache=False, progress=False).input_ids
    b = generate_calibration(tiny_llama, SMALL, cache=False, progress=False).input_ids
    other_batch = dataclasses.replace(SMALL, batch_size=3)  # batches of 3 and 1
    c = generate_calibration(tiny_llama, other_batch, cache=False, progress=False).input_ids
    other_seed = dataclasses.replace(SMALL, seed=1)
    d = generate_calibration(tiny_llama, other_seed, cache=False, progress=False).input_ids
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # all randomness is drawn up front, independent of batching
    assert not torch.equal(a, d)


def test_tiny_top_p_is_greedy(tiny_llama):
    nucleus = dataclasses.replace(SMALL, greedy_steps=0, top_p=1e-6)
    data = generate_calibration(tiny_llama, nucleus, cache=False, progress=False)
    expected = _argmax_continuation(tiny_llama, data.input_ids[:, :1], SMALL.seq_len - 1)
    assert torch.equal(data.input_ids, expected)


def test_teacher_left_in_training_mode_is_restored(tiny_llama):
    tiny_llama.train()
    generate_calibration(tiny_llama, dataclasses.replace(SMALL, seq_len=3), cache=False, progress=False)
    assert tiny_llama.training is True


# ----------------------------------------------------------------------------- sampling


def test_sample_from_logits_matches_the_softmax():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    n = 20_000
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # stratified: exact frequencies
    for temperature in (1.0, 0.5):
        ids = sample_from_logits(logits.expand(n, -1), uniform, temperature=temperature)
        freq = torch.bincount(ids, minlength=5).double() / n
        torch.testing.assert_close(freq, torch.softmax(logits[0].double() / temperature, -1), atol=1e-3, rtol=0)


def test_sample_from_logits_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    n = 10_000
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ids = sample_from_logits(probs.log().expand(n, -1), uniform, top_p=0.6)
    freq = torch.bincount(ids, minlength=4).double() / n
    # sorted mass: 0.4 (before 0) | 0.3 (before 0.4) | 0.2 (before 0.7: dropped) | 0.1 dropped
    torch.testing.assert_close(freq, torch.tensor([0.0, 4 / 7, 3 / 7, 0.0], dtype=torch.float64), atol=1e-3, rtol=0)


def test_sample_from_logits_never_picks_zero_probability_tokens():
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]]).expand(3, -1)
    for top_p in (1.0, 0.9):
        ids = sample_from_logits(logits, torch.tensor([0.0, 0.5, 1.0 - 1e-16], dtype=torch.float64), top_p=top_p)
        assert set(ids.tolist()) <= {0, 2}


def test_first_token_candidates_with_a_tokenizer():
    class Tok:
        all_special_ids = [0, 5]

        def __len__(self):
            return 8

    assert first_token_candidates(10, tokenizer=Tok(), special_ids=(7,)).tolist() == [1, 2, 3, 4, 6]
    with pytest.raises(ConfigError, match="first_token_range"):
        first_token_candidates(10, tokenizer=Tok(), token_range=(0, 9))
    with pytest.raises(ConfigError, match="no first-token candidates"):
        first_token_candidates(10, token_range=(5, 6), special_ids=(5,))


# ----------------------------------------------------------------------------- cache


def test_cache_is_written_then_reused_without_calling_the_teacher(tiny_llama, tmp_path):
    first = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    assert first.from_cache is False and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == tmp_path and first.cache_path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temporary left over

    calls = _count_calls(tiny_llama)
    second = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    assert calls[0] == 0
    assert second.from_cache is True and second.seconds == 0.0 and second.cache_path == first.cache_path
    assert torch.equal(second.input_ids, first.input_ids)
    assert second.meta["format_version"] == CALIBRATION_FORMAT_VERSION
    assert second.meta["teacher_key"] == first.meta["teacher_key"]


def test_cache_file_is_plain_safetensors_with_json_metadata(tiny_llama, tmp_path):
    from safetensors import safe_open

    data = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    with safe_open(str(data.cache_path), framework="pt") as f:
        assert list(f.keys()) == ["input_ids"]
        meta = json.loads(f.metadata()["dbllm_calibration"])
        assert torch.equal(f.get_tensor("input_ids"), data.input_ids)
    assert meta["spec"] == SMALL.to_dict() and meta["key"] == data.cache_path.stem


def test_cache_invalidated_when_teacher_weights_change(tiny_llama, tmp_path):
    first = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 5] += 0.01
    calls = _count_calls(tiny_llama)
    second = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    assert second.from_cache is False and calls[0] > 0
    assert second.cache_path != first.cache_path
    assert second.meta["teacher_key"] != first.meta["teacher_key"]


def test_cache_invalidated_when_spec_changes(tiny_llama, tmp_path):
    first = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    changed = generate_calibration(tiny_llama, dataclasses.replace(SMALL, seed=7), cache_dir=tmp_path, progress=False)
    assert changed.from_cache is False and changed.cache_path != first.cache_path
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"num_sequences": 5}, {"seq_len": 9}, {"greedy_steps": 3}, {"temperature": 0.9},
        {"top_p": 0.95}, {"seed": 1}, {"first_token_range": (0, 64)},
    ],
    ids=lambda c: next(iter(c)),
)
def test_cache_key_covers_every_spec_field(change):
    candidates = torch.arange(128)
    base = calibration_cache_key("teacher", SMALL, candidates)
    assert calibration_cache_key("teacher", SMALL, candidates) == base
    assert calibration_cache_key("teacher", dataclasses.replace(SMALL, **change), candidates) != base


def test_cache_key_leaves_out_the_generation_batch(tiny_llama, tmp_path):
    """The batch splits the work only (the data are the same, test above), and its CLI default
    follows the free GPU memory: another batch must find the same file."""
    candidates = torch.arange(128)
    assert calibration_cache_key("t", dataclasses.replace(SMALL, batch_size=1), candidates) == \
        calibration_cache_key("t", SMALL, candidates)
    first = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    again = generate_calibration(tiny_llama, dataclasses.replace(SMALL, batch_size=3), cache_dir=tmp_path,
                                 progress=False)
    assert again.from_cache and torch.equal(again.input_ids, first.input_ids)


def test_cache_key_covers_teacher_and_first_tokens():
    candidates = torch.arange(128)
    base = calibration_cache_key("teacher", SMALL, candidates)
    assert calibration_cache_key("other", SMALL, candidates) != base
    assert calibration_cache_key("teacher", SMALL, candidates[1:]) != base
    assert {f.name for f in dataclasses.fields(CalibrationSpec)} == set(SMALL.to_dict())


def test_teacher_fingerprint_sees_weights_and_config(tiny_llama):
    base = teacher_fingerprint(tiny_llama)
    assert teacher_fingerprint(tiny_llama) == base
    with torch.no_grad():
        tiny_llama.model.norm.weight.mul_(1.001)
    changed = teacher_fingerprint(tiny_llama)
    assert changed != base
    tiny_llama.config.rms_norm_eps = 1e-3
    assert teacher_fingerprint(tiny_llama) != changed


def test_teacher_fingerprint_sees_a_swap_and_ignores_buffers_derived_from_the_config(tiny_llama):
    base = teacher_fingerprint(tiny_llama)
    rotary = tiny_llama.model.rotary_emb
    assert "inv_freq" in dict(rotary.named_buffers()) and "inv_freq" not in rotary.state_dict()
    with torch.no_grad():
        rotary.inv_freq.mul_(1 + 2**-20)  # a device's own rounding of a derived buffer
    assert teacher_fingerprint(tiny_llama) == base
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[0, :2] = w[0, :2].flip(0).clone()  # same values, same sum: only the positions differ
    assert teacher_fingerprint(tiny_llama) != base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.bool])
def test_bit_checksums_are_the_exact_integer_sums_across_chunks(monkeypatch, dtype):
    import dbllm_compile.distill.calibration.cache as cache

    monkeypatch.setattr(cache, "_CHECKSUM_CHUNK", 7)      # many chunks ...
    monkeypatch.setattr(cache, "_CHECKSUM_MODULUS", 5)    # ... starting at every position weight
    torch.manual_seed(0)
    x = (torch.randn(53) * 50).to(dtype)
    if x.element_size() == 1:
        words = x.to(torch.uint8).tolist() if dtype == torch.bool else x.view(torch.uint8).tolist()
    else:
        words = [v + 32768 for v in x.view(torch.int16).tolist()]
    expect = (sum(words), sum(v * (i % 5 + 1) for i, v in enumerate(words)))
    assert cache._bit_checksums(x) == expect


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_fingerprint_is_the_same_on_cpu_and_cuda(tiny_llama):
    on_cpu = teacher_fingerprint(tiny_llama)
    assert teacher_fingerprint(tiny_llama.cuda()) == on_cpu


@pytest.mark.parametrize(
    "corruption", ["garbage", "truncated", "wrong_shape"], ids=["garbage", "truncated", "wrong_shape"]
)
def test_corrupt_cache_file_warns_and_regenerates(tiny_llama, tmp_path, corruption):
    from safetensors.torch import save_file

    first = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    path = first.cache_path
    if corruption == "garbage":
        path.write_bytes(b"not a safetensors file" * 4)
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        meta = json.dumps({**first.meta})
        save_file({"input_ids": first.input_ids[:2]}, str(path), metadata={"dbllm_calibration": meta})
    calls = _count_calls(tiny_llama)
    with pytest.warns(CalibrationCacheWarning, match="unusable"):
        again = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    assert calls[0] > 0 and again.from_cache is False
    assert torch.equal(again.input_ids, first.input_ids)
    reloaded = generate_calibration(tiny_llama, SMALL, cache_dir=tmp_path, progress=False)
    assert reloaded.from_cache is True


def test_explicit_teacher_key_and_default_cache_dir(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("DBLLM_CACHE", str(tmp_path))
    data = generate_calibration(tiny_llama, SMALL, teacher_key="my-teacher", progress=False)
    assert data.cache_path.parent == tmp_path / "calibration"
    assert data.meta["teacher_key"] == "my-teacher"


# ----------------------------------------------------------------------------- corpus and mix


class _CharTokenizer:
    """One token per character (id = code point % 128), with a BOS id 1 in front."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[1] + [ord(c) % 128 for c in text]])
        return type("Encoding", (), {"input_ids": ids})()


def test_corpus_windows_are_consecutive_from_the_start():
    spec = CalibrationSpec(num_sequences=3, seq_len=4)
    data = corpus_calibration(_CharTokenizer(), "abcdefghijklmnop", spec)
    expected = torch.tensor([1] + [ord(c) for c in "abcdefghijk"]).reshape(3, 4)
    assert torch.equal(data.input_ids, expected)
    assert data.source == "corpus" and data.tokens == 12 and data.meta["corpus_tokens"] == 17


def test_corpus_too_short_names_needed_and_available():
    with pytest.raises(ConfigError, match=r"has 6 tokens but 2 sequences of 4 tokens need 8"):
        corpus_calibration(_CharTokenizer(), "abcde", CalibrationSpec(num_sequences=2, seq_len=4))


def test_mix_takes_the_fraction_from_b_reproducibly():
    a = CalibrationData(torch.zeros(8, 5, dtype=torch.long), source="generated", tokens=40, seconds=1.0)
    b = CalibrationData(torch.arange(1, 41).reshape(8, 5), source="corpus", tokens=40, seconds=0.5)
    mixed = mix_calibration(a, b, fraction_b=0.25, seed=3)
    assert mixed.source == "mixed" and mixed.input_ids.shape == (8, 5) and mixed.seconds == 1.5
    from_b = mixed.input_ids[mixed.input_ids[:, 0] != 0]
    assert from_b.shape[0] == 2 and mixed.meta["rows_from_b"] == 2
    assert all(any(torch.equal(row, r) for r in b.input_ids) for row in from_b)  # whole rows of b
    assert torch.equal(mixed.input_ids, mix_calibration(a, b, fraction_b=0.25, seed=3).input_ids)
    assert torch.equal(mix_calibration(a, b, 0.0).input_ids, a.input_ids)
    assert mix_calibration(a, b, 1.0, num_sequences=4).input_ids[:, 0].ne(0).all()


def test_mix_errors():
    a = CalibrationData(torch.zeros(4, 5, dtype=torch.long), source="generated", tokens=20, seconds=0.0)
    b = CalibrationData(torch.ones(2, 5, dtype=torch.long), source="corpus", tokens=10, seconds=0.0)
    with pytest.raises(ConfigError, match="fraction_b"):
        mix_calibration(a, b, 1.5)
    with pytest.raises(ConfigError, match="3 rows are needed from b but it has 2"):
        mix_calibration(a, b, 0.75)
    c = CalibrationData(torch.ones(4, 6, dtype=torch.long), source="corpus", tokens=24, seconds=0.0)
    with pytest.raises(ConfigError, match="different seq_len"):
        mix_calibration(a, c, 0.5)


# ----------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_sequences", 0), ("seq_len", 1), ("greedy_steps", -1), ("batch_size", 0), ("seed", -1),
        ("num_sequences", 2.0), ("seq_len", True), ("temperature", 0.0), ("temperature", math.inf),
        ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5), ("first_token_range", (5, 5)),
        ("first_token_range", (-1, 4)), ("first_token_range", (1, 2, 3)),
    ],
)
def test_bad_spec_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"CalibrationSpec.{field}"):
        CalibrationSpec(**{field: value})


def test_spec_round_trip_and_normalisation():
    spec = CalibrationSpec(temperature=1, first_token_range=[3, 9])
    assert spec.temperature == 1.0 and isinstance(spec.temperature, float)
    assert spec.first_token_range == (3, 9)
    assert CalibrationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="no field"):
        CalibrationSpec.from_dict({"seq_length": 4})


def test_first_token_range_past_the_vocabulary(tiny_llama):
    with pytest.raises(ConfigError, match="reaches past the vocabulary"):
        generate_calibration(tiny_llama, dataclasses.replace(SMALL, first_token_range=(0, 500)), cache=False)


def test_real_tokenizer_special_tokens_are_never_first(tiny_hf_dir):
    _, model, tokenizer = tiny_hf_dir
    spec = CalibrationSpec(num_sequences=256, seq_len=2, batch_size=256)
    first = generate_calibration(model, spec, tokenizer=tokenizer, cache=False, progress=False).input_ids[:, 0]
    assert not torch.isin(first, torch.tensor(tokenizer.all_special_ids)).any()
    assert int(first.max()) < len(tokenizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu(tiny_llama):
    spec = dataclasses.replace(SMALL, num_sequences=8, seq_len=16)
    on_cpu = generate_calibration(tiny_llama, spec, cache=False, progress=False)
    on_gpu = generate_calibration(tiny_llama.cuda(), spec, cache=False, progress=False)
    assert on_gpu.input_ids.device.type == "cpu" and on_gpu.meta["device"].startswith("cuda")
    # Same seed, same uniforms: only the teacher's rounding may differ between devices.
    agreement = (on_gpu.input_ids == on_cpu.input_ids).double().mean().item()
    assert agreement > 0.9, agreement
    assert torch.equal(on_gpu.input_ids[:, : 1 + spec.greedy_steps], on_cpu.input_ids[:, : 1 + spec.greedy_steps])


def test_fingerprint_of_a_tensor_larger_than_float32_can_index():
    """Regression: a float32 linspace over 2**24+ elements rounded past the end (SmolLM2's embedding)."""
    big = torch.nn.Module()
    big.register_buffer("w", torch.zeros(28_311_552))
    from dbllm_compile.distill.calibration import teacher_fingerprint

    assert len(teacher_fingerprint(big)) == 64


def test_default_generation_batch_fits_the_kv_caches_in_half_the_free_memory(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dbllm_compile.distill.calibration import default_generation_batch
    from dbllm_compile.distill.calibration import generate as gen

    torch.manual_seed(0)
    # SmolLM2-135M's cache shape: 30 layers, 3 KV heads of 64, float32; vocabulary kept small here
    model = LlamaForCausalLM(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                         num_hidden_layers=30, intermediate_size=16, vocab_size=1000))
    assert default_generation_batch(model, 512) == 64  # off CUDA
    per_sequence = 30 * 2 * 3 * 64 * 512 * 4 + 24 * 1000  # 23.6 MB of cache + the sampling buffers
    free = {}
    monkeypatch.setattr(gen, "_default_device", lambda teacher: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    for free_bytes, expected in [(79 << 30, 1024), (20 * per_sequence, 8), (2 * per_sequence, 1), (0, 1)]:
        free["bytes"] = free_bytes
        assert default_generation_batch(model, 512) == expected, free_bytes
    free["bytes"] = 79 << 30
    assert default_generation_batch(model, 512, cap=256) == 256
    assert default_generation_batch(model.half(), 4096) == 256  # half the bytes per entry, 8x the length: 418 fit
