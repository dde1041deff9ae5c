"""``dbllm_compile.tensor_cache.TensorCache``: the per-layer weight caches of the backend and the
kernel dispatcher (identity + version of the source tensors, dropped when a source dies)."""

import gc

import torch

from dbllm_compile.tensor_cache import TensorCache


def test_hit_miss_on_extra_key_version_and_identity():
    cache = TensorCache()
    a, b = torch.ones(3), torch.zeros(2)
    value = cache.put((a, b), "v", extra="fp16")
    assert value == "v" and cache.get((a, b), "fp16") == "v"
    assert cache.get((a, b), "bf16") is None  # another extra key
    assert cache.get((b, a), "fp16") is None  # order is part of the key
    a.add_(1)  # an in-place update bumps the version: stale
    assert cache.get((a, b), "fp16") is None
    cache.put((a, b), "w", extra="fp16")
    assert cache.get((a, b), "fp16") == "w" and len(cache) == 1


def test_entry_dies_with_a_source_tensor_and_clear_empties():
    cache = TensorCache()
    a, b = torch.ones(3), torch.zeros(2)
    cache.put((a, b), "v")
    cache.put((b,), "u")
    assert len(cache) == 2
    del a
    gc.collect()
    assert len(cache) == 1 and cache.get((b,)) == "u"
    cache.clear()
    assert len(cache) == 0
