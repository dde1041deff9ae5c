"""``dbllm_compile.bench.distill_step_speed``: the variants, the rotated step and the profile rows
(what ``benchmarks/gpu_compile_bench.py --parts distill`` reports on the GPU)."""

import pytest
import torch

from dbllm_compile.bench import distill_step_speed, llama_model


def test_rotated_eager_step_is_timed_and_profiled():
    model = llama_model("tiny", "cpu", torch.float32)
    r = distill_step_speed(model, batch=2, seq_len=8, steps=2, rotation_block=16, variants=("eager",), profile_steps=1)
    assert r["rotation_block"] == 16 and "compiled" not in r and "speedup" not in r
    e = r["eager"]
    assert e["seconds_per_step"] > 0 and e["scales_changed_fraction"] > 0.5
    names = [row["name"] for row in e["profile"]]
    assert 0 < len(names) <= 25 and all(row["us_per_step"] >= 0 for row in e["profile"])
    assert any("dbllm" in n or "mm" in n for n in names), names


def test_unknown_variant_is_refused():
    model = llama_model("tiny", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown variants"):
        distill_step_speed(model, batch=1, seq_len=4, steps=1, variants=("fast",))


def test_decode_speed_times_extra_variants_and_profiles(monkeypatch):
    """The decode benchmark's extra backend variants and per-token profile rows, on CPU (eager
    mode, so nothing compiles: the structure of the result is what is checked)."""
    from dbllm_compile.bench import decode_speed

    model = llama_model("tiny", "cpu", torch.float32)
    r = decode_speed(model, prompt_len=4, new_tokens=3, options={"init": "maxabs"}, mode=None,
                     extra={"dbllm_unfused": {"init": "maxabs", "fuse_siblings": False, "fuse_glu": False}}, profile_tokens=2)
    assert {"baseline", "dbllm", "dbllm_unfused"} <= r.keys()
    assert r["decode_speedup_dbllm_unfused"] > 0 and r["decode_speedup"] > 0
    for name in ("baseline", "dbllm", "dbllm_unfused"):
        rows = r[name]["profile"]
        assert rows and all(row["us_per_token"] >= 0 and "us_per_step" not in row for row in rows)
    assert "backend_stats" in r["dbllm_unfused"] and "backend_stats" not in r["baseline"]
