"""The GPU-machine scripts cannot run in CI, but their generated code must at least be valid Python
(a step that dies of a SyntaxError on the GPU machine wastes a device call)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_aoti_check_step_is_valid_python(tmp_path):
    aoti = _load("gpu_aoti_check")
    for name in aoti.STEPS:
        compile(aoti.step_code(name, tmp_path), f"<step {name}>", "exec")


@pytest.mark.parametrize("script", ["gpu_distill_ablation", "gpu_compile_bench", "gpu_aoti_check", "distill_host",
                                    "bench_kernels", "sweep_gemv", "ncu_gemv", "bench_attention", "bench_pdl"])
def test_gpu_scripts_show_help(script):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.sh")))
def test_gpu_shell_scripts_parse(script):
    import subprocess

    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_distill_host_runs_the_real_end_to_end_stage_on_cpu(tmp_path):
    """``distill_host.py --e2e-steps``: train_end_to_end itself, the old form (eager teacher) and the
    new (compiled teacher; no CUDA graphs on CPU), same data and seed: the same losses."""
    import json
    import subprocess

    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_host.py"), "--layers", "1",
                           "--seq-len", "16", "--e2e-steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["train_e2e"]
    assert [(r["compile_teacher"], r["cuda_graphs"]) for r in runs] == [(False, False), (True, True)]
    a, b = (r["losses"] for r in runs)
    assert len(a) == len(b) == 2
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b))
