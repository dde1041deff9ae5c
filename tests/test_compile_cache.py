"""The portable compile cache of the end-to-end step (``distill/compile_cache.py``)."""

from __future__ import annotations

import lzma
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.distill import DistillConfig
from dbllm_compile.distill.checkpoint import MetricsLog
from dbllm_compile.distill.compile_cache import CompileCacheWarning, load_compile_cache
from dbllm_compile.errors import ConfigError

# One process compiles a function with Inductor and saves the cache file; a second one, with an
# empty Inductor cache directory, loads the file and must hit Inductor's FX-graph cache.
_CHILD = textwrap.dedent("""
    import sys, torch
    from torch._dynamo.utils import counters
    from dbllm_compile.distill.compile_cache import load_compile_cache, save_compile_cache

    mode, path = sys.argv[1], sys.argv[2]
    if mode == "load":
        assert load_compile_cache(path) is not None
    f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(-1) * 3)
    f(torch.randn(8, 8))
    if mode == "save":
        print("saved", save_compile_cache(path)["artifacts"])
    print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
""")


def _child(mode: str, path, cache_dir) -> str:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_fresh_cache_directory_hits_after_loading_the_file(tmp_path):
    path = tmp_path / "step.compile-cache"
    out = _child("save", path, tmp_path / "inductor_a")
    assert "saved {'inductor': 1" in out and "hits 0 misses 1" in out, out
    stored = path.read_bytes()
    assert stored.startswith(b"\xfd7zXZ\x00")  # xz-compressed
    assert "hits 1 misses 0" in _child("load", path, tmp_path / "inductor_b")
    legacy = tmp_path / "legacy.compile-cache"  # as written before compression: still loads
    legacy.write_bytes(lzma.decompress(stored))
    assert len(legacy.read_bytes()) > len(stored)
    assert "hits 1 misses 0" in _child("load", legacy, tmp_path / "inductor_c")


def test_missing_and_unusable_files_never_stop_a_run(tmp_path):
    assert load_compile_cache(tmp_path / "absent") is None
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a cache")
    with pytest.warns(CompileCacheWarning, match=r"bad is unusable .*Delete the file"):
        assert load_compile_cache(bad) is None


def test_config_needs_the_compiled_step():
    with pytest.raises(ConfigError, match="compile_cache caches the compiled step: set compile=True"):
        DistillConfig(compile_cache="step.cache")
    with pytest.raises(ConfigError, match="must be a file path"):
        DistillConfig(compile=True, compile_cache=None)
    assert DistillConfig(compile=True, compile_cache="x").to_dict()["compile_cache"] == "x"


def test_end_to_end_loads_before_compiling_and_saves_after_the_first_step(tiny_llama, tmp_path, monkeypatch):
    import dbllm_compile.distill.end_to_end as e2e
    from dbllm_compile.distill.step import build_step

    calls = []
    monkeypatch.setattr(e2e, "load_compile_cache", lambda p: calls.append(("load", p)) or None)
    monkeypatch.setattr(e2e, "save_compile_cache", lambda p: calls.append(("save", p)) or {"bytes": 1})

    def eager_step(*args, **kwargs):  # the wiring, not the compile: build the eager step, record the order
        calls.append(("build",))
        return build_step(*args, **{**kwargs, "compile": False})

    monkeypatch.setattr(e2e, "build_step", eager_step)
    data = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    student = dc.quantize(tiny_llama, (data[:2],), dc.DBLLMConfig(init="maxabs"),
                          example_kwargs={"use_cache": False}, progress=False)
    metrics = MetricsLog(None)
    cache = str(tmp_path / "c.bin")
    e2e.train_end_to_end(student, lambda x: tiny_llama(x, use_cache=False), data,
                         DistillConfig(steps=3, batch_size=2, compile=True, compile_cache=cache),
                         metrics=metrics, progress=False)
    assert calls == [("load", cache), ("build",), ("save", cache)]  # saved once, after the first step
    steps = [r for r in metrics.records if "step" in r]
    assert steps[0]["first_step_seconds"] > 0 and steps[0]["compile_cache_saved"] == {"bytes": 1}
    assert all("first_step_seconds" not in r for r in steps[1:])
    assert any(r.get("compile_cache_loaded") == {"file": cache, "bytes": 0} for r in metrics.records)
