"""Tests of dbllm_compile.evaluate: the perplexity protocol, texts, and errors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbllm_compile import evaluate
from dbllm_compile.evaluate import (
    PerplexityResult,
    default_eval_text,
    load_eval_text,
    perplexity,
    window_ids,
)

# ----------------------------------------------------------------------------- fake models


class UniformLM(torch.nn.Module):
    """Logits all equal: every token has probability 1/V, so perplexity == V exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.clone())
        return torch.zeros(*ids.shape, self.vocab)


class NextTokenLM(torch.nn.Module):
    """Puts logit ``a`` on ``(id + 1) % V`` and 0 elsewhere.

    On ids counting up (mod V) every prediction is "right": p = e^a / (e^a + V - 1).
    """

    def __init__(self, vocab: int, a: float, wrap: str = "tensor") -> None:
        super().__init__()
        self.vocab, self.a, self.wrap = vocab, a, wrap
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(-1, ((ids + 1) % self.vocab).unsqueeze(-1), self.a)
        if self.wrap == "dict":
            return {"logits": logits}
        if self.wrap == "attr":
            return SimpleNamespace(logits=logits, past_key_values=None)
        if self.wrap == "tuple":
            return (logits, None)
        return logits


class CharTokenizer:
    """Maps each character to its code point; mimics ``tokenizer(text, return_tensors="pt")``."""

    def __call__(self, text: str, return_tensors: str | None = None):
        assert return_tensors == "pt"
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


# ----------------------------------------------------------------------------- formula


def test_uniform_logits_give_vocab_size() -> None:
    vocab = 37
    result = perplexity(UniformLM(vocab), torch.arange(200) % vocab, seq_len=16, max_windows=None, progress=False)
    assert result.perplexity == pytest.approx(vocab, rel=1e-6)
    assert result.nll == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.windows == 12 and result.seq_len == 16 and result.tokens == 12 * 15
    assert result.seconds >= 0
    assert isinstance(result, PerplexityResult)


@pytest.mark.parametrize("wrap", ["tensor", "dict", "attr", "tuple"])
def test_closed_form_next_token_model(wrap: str) -> None:
    vocab, a = 11, 2.5
    ids = torch.arange(300) % vocab  # every next token is the predicted one
    result = perplexity(NextTokenLM(vocab, a, wrap), ids, seq_len=20, max_windows=None, progress=False)
    expected_nll = -(a - math.log(math.exp(a) + vocab - 1))
    assert result.nll == pytest.approx(expected_nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected_nll), rel=1e-6)
    assert result.windows == 15 and result.tokens == 15 * 19


def test_mixed_right_and_wrong_predictions() -> None:
    """Window [0, 1, 5]: 0->1 predicted (p_hit), 1->5 not (p_miss); mean nll of the two."""
    vocab, a = 8, 1.0
    p_hit = math.exp(a) / (math.exp(a) + vocab - 1)
    p_miss = 1.0 / (math.exp(a) + vocab - 1)
    result = perplexity(NextTokenLM(vocab, a), torch.tensor([0, 1, 5]), seq_len=3, progress=False)
    expected = -(math.log(p_hit) + math.log(p_miss)) / 2
    assert result.nll == pytest.approx(expected, rel=1e-6) and result.tokens == 2


def test_matches_hugging_face_loss() -> None:
    """On a tiny random Llama, one window's perplexity is exp of the model's own mean loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (50,))
    result = perplexity(model, ids, seq_len=32, progress=False)
    with torch.inference_mode():
        loss = model(ids[None, :32], labels=ids[None, :32]).loss
    assert result.windows == 1 and result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert model.training, "the train/eval mode of the model must be restored"


def test_chunked_loss_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 13, dtype=torch.bfloat16)
    ids = torch.randint(0, 13, (2, 9))
    full = evaluate._nll_sum(logits, ids)
    monkeypatch.setattr(evaluate, "_LOSS_CHUNK_ELEMENTS", 13 * 3)  # 3 rows per chunk
    assert evaluate._nll_sum(logits, ids) == pytest.approx(full, rel=1e-6)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 13), ids[:, 1:].reshape(-1), reduction="sum"
    )
    assert full == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- windows


def test_windows_drop_tail_and_respect_max_windows() -> None:
    model = UniformLM(200)
    ids = torch.arange(107)
    result = perplexity(model, ids, seq_len=10, max_windows=None, progress=False)
    assert result.windows == 10 and len(model.calls) == 10
    assert torch.equal(torch.cat([c[0] for c in model.calls]), torch.arange(100))  # tail 100..106 dropped

    model = UniformLM(200)
    result = perplexity(model, ids, seq_len=10, max_windows=3, progress=False)
    assert result.windows == 3 and result.tokens == 27
    assert [c[0, 0].item() for c in model.calls] == [0, 10, 20]  # the FIRST windows


def test_batch_size_groups_windows_without_changing_result() -> None:
    ids = torch.arange(330) % 11
    one = perplexity(NextTokenLM(11, 1.5), ids, seq_len=30, max_windows=None, progress=False)
    model = UniformLM(11)
    perplexity(model, ids, seq_len=30, max_windows=7, batch_size=3, progress=False)
    assert [tuple(c.shape) for c in model.calls] == [(3, 30), (3, 30), (1, 30)]
    batched = perplexity(NextTokenLM(11, 1.5), ids, seq_len=30, max_windows=None, batch_size=4, progress=False)
    assert batched.perplexity == pytest.approx(one.perplexity, rel=1e-6) and batched.windows == one.windows == 11


@settings(max_examples=40, deadline=None)
@given(
    total=st.integers(min_value=2, max_value=400),
    seq_len=st.integers(min_value=2, max_value=64),
    max_windows=st.one_of(st.none(), st.integers(min_value=1, max_value=20)),
)
def test_window_ids_property(total: int, seq_len: int, max_windows: int | None) -> None:
    ids = torch.arange(total)
    if total < seq_len:
        with pytest.raises(ValueError, match=f"has {total} tokens"):
            window_ids(ids, seq_len, max_windows)
        return
    windows = window_ids(ids, seq_len, max_windows)
    expected = total // seq_len if max_windows is None else min(total // seq_len, max_windows)
    assert windows.shape == (expected, seq_len)
    assert torch.equal(windows.reshape(-1), ids[: expected * seq_len])


# ----------------------------------------------------------------------------- inputs


def test_ids_input_shapes_agree() -> None:
    ids = torch.arange(120) % 9
    flat = perplexity(NextTokenLM(9, 2.0), ids, seq_len=12, progress=False)
    batched = perplexity(NextTokenLM(9, 2.0), ids[None, :], seq_len=12, progress=False)
    as_int32 = perplexity(NextTokenLM(9, 2.0), ids.int(), seq_len=12, progress=False)
    assert flat == PerplexityResult(**{**vars(batched), "seconds": flat.seconds})
    assert as_int32.perplexity == flat.perplexity


def test_tokenizer_path_tokenizes_whole_text() -> None:
    text = "abcdefghij" * 10  # 100 chars -> 100 ids
    model = UniformLM(200)
    result = perplexity(model, CharTokenizer(), text, seq_len=30, max_windows=None, progress=False)
    assert result.windows == 3
    assert model.calls[1][0].tolist() == [ord(c) for c in text[30:60]]


def test_tokenizer_with_dict_output_and_default_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "default_eval_text", lambda: "xyz" * 20)

    def tokenizer(text: str, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    result = perplexity(UniformLM(300), tokenizer, seq_len=10, max_windows=None, progress=False)
    assert result.windows == 6 and result.perplexity == pytest.approx(300)


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    perplexity(UniformLM(5), torch.arange(40) % 5, seq_len=10, progress=True, desc="unit-test-bar")
    assert "unit-test-bar" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors


def test_too_few_tokens_says_counts() -> None:
    with pytest.raises(ValueError, match=r"has 100 tokens.*seq_len=512"):
        perplexity(UniformLM(5), torch.zeros(100, dtype=torch.long), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1}, "seq_len must be an int >= 2"),
        ({"seq_len": 8.0}, "seq_len must be an int"),
        ({"max_windows": 0}, "max_windows must be a positive int or None"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        perplexity(UniformLM(5), torch.zeros(64, dtype=torch.long), **{"seq_len": 8, **kwargs}, progress=False)


def test_bad_ids() -> None:
    with pytest.raises(ValueError, match=r"1-D or of shape \[1, T\], got shape \[2, 32\]"):
        perplexity(UniformLM(5), torch.zeros(2, 32, dtype=torch.long), seq_len=8, progress=False)
    with pytest.raises(TypeError, match="integer tensor.*float32"):
        perplexity(UniformLM(5), torch.zeros(64), seq_len=8, progress=False)
    with pytest.raises(ValueError, match="not ids and a text"):
        perplexity(UniformLM(5), torch.zeros(64, dtype=torch.long), "some text", seq_len=8, progress=False)
    with pytest.raises(TypeError, match="tokenizer .* or a LongTensor"):
        perplexity(UniformLM(5), [1, 2, 3], seq_len=8, progress=False)


def test_bad_model_outputs() -> None:
    ids = torch.zeros(64, dtype=torch.long)
    with pytest.raises(TypeError, match="model output of type str has no logits"):
        perplexity(lambda x: "nope", ids, seq_len=8, progress=False)
    with pytest.raises(ValueError, match=r"logits of shape \[1, 8\] for input of shape \[1, 8\]"):
        perplexity(lambda x: torch.zeros(1, 8), ids, seq_len=8, progress=False)


# ----------------------------------------------------------------------------- texts


def test_default_eval_text_is_deterministic_pydoc_topics() -> None:
    from pydoc_data.topics import topics

    text = default_eval_text()
    assert text == default_eval_text()
    assert text.startswith(topics[sorted(topics)[0]])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(topics) - 1)
    assert len(text) > 100_000


def test_load_eval_text_normalises_newlines(tmp_path: Path) -> None:
    file = tmp_path / "t.txt"
    file.write_bytes("héllo\r\nworld\rend\n".encode())
    assert load_eval_text(file) == "héllo\nworld\nend\n" == file.read_text(encoding="utf-8")


def test_load_eval_text_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_eval_text(missing)
    assert str(missing) in str(err.value)

    with pytest.raises(FileNotFoundError, match="not a regular file"):
        load_eval_text(tmp_path)

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty") as err:
        load_eval_text(empty)
    assert str(empty) in str(err.value)

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 0xe9 at offset 3") as err:
        load_eval_text(latin)
    assert str(latin) in str(err.value)
