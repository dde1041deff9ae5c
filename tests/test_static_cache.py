"""The generator's static cache written at the step's positions (dbllm_compile/static_cache.py):
same tokens and cache contents as transformers' per-layer counters, one counter advanced per step."""

from __future__ import annotations

import pytest
import torch

from dbllm_compile import static_cache
from dbllm_compile.errors import DBLLMError
from dbllm_compile.generate import StaticCacheGenerator

transformers = pytest.importorskip("transformers")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).eval()


def _generate(model, backend, convert: bool, monkeypatch):
    if not convert:
        monkeypatch.setattr("dbllm_compile.generate.use_step_positions", lambda cache: False)
    gen = StaticCacheGenerator(model, max_cache_len=32, backend=backend, attention="sdpa")
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = gen.generate(ids, 6)
    monkeypatch.undo()
    return out.tokens, gen._cache


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_step_positions_give_the_same_tokens_and_cache(backend, monkeypatch):
    model = _model()
    torch._dynamo.reset()
    ref_tokens, ref_cache = _generate(model, backend, False, monkeypatch)
    torch._dynamo.reset()
    tokens, cache = _generate(model, backend, True, monkeypatch)
    torch._dynamo.reset()
    if not getattr(cache, "_dbllm_steps", None):
        pytest.skip(f"transformers {transformers.__version__}: the cache layers are not plain StaticLayers")
    assert torch.equal(tokens, ref_tokens)
    layers = cache.layers
    assert all(layer.cumulative_length is layers[0].cumulative_length for layer in layers)
    for layer, ref in zip(layers, ref_cache.layers):
        assert int(layer.cumulative_length) == int(ref.cumulative_length) == 5 + 5  # prompt + 5 decode steps
        torch.testing.assert_close(layer.keys, ref.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, ref.values, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ref_cache.get_seq_length()


def test_converted_layer_without_positions_names_the_fix():
    from transformers.cache_utils import StaticLayer

    model = _model()
    gen = StaticCacheGenerator(model, max_cache_len=16, backend=None)
    cache = gen._fresh_cache(1)
    if not isinstance(cache.layers[0], StaticLayer) or not getattr(cache, "_dbllm_steps", None):
        pytest.skip("cache layers not converted by this transformers version")
    cache._dbllm_steps.position = None
    k = torch.zeros(1, 2, 1, 16)
    with pytest.raises(DBLLMError, match="set_step_positions"):
        cache.layers[0].update(k, k)
    assert static_cache.use_step_positions(cache)  # converting twice is a no-op
