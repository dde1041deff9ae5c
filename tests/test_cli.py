"""The ``dbllm-compile`` command line, end to end on a tiny local Hugging Face model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dbllm_compile.artifact.format import ARTIFACT_VERSION
from dbllm_compile.cli import main


def test_quantize_main_job_on_a_local_model(tiny_hf_dir, tmp_path, capsys):
    directory, _, _ = tiny_hf_dir
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    rc = main(["quantize", "--model", str(directory), "--eval-text", str(text), "--windows", "2",
               "--seq-len", "32", "--out", str(out), "--json", "--steps", "4", "--block-steps", "2",
               "--tokens", "256", "--calib-seq-len", "32", "--latent-lr", "1e-4", "--block-lr", "3e-4"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{\n"):])
    cfg = results["distill"]["config"]
    assert (cfg["latent_lr"], cfg["block_lr"], cfg["lr"]) == (1e-4, 3e-4, 5e-4)  # flags reach the config; lr default
    assert results["layers_rewritten"] == 14 and results["layers_skipped"] == ["lm_head"]
    assert results["bits_per_weight"] == pytest.approx(2.5)
    for label in ("python-docs (default)", str(text)):
        ppl = results["perplexity"][label]
        assert ppl["windows"] == 2 and ppl["fp"] > 1 and ppl["2bit"] > 1 and ppl["ptq"] > 1
    assert results["calibration"]["tokens"] == 256 and results["distill"]["budget"]["steps"] == 4
    assert results["distill"]["config"]["compile"] is False  # --compile is opt-in
    run_dir = out.with_name("out-run")
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "loss.png").is_file()
    manifest = json.loads((out / "dbllm.json").read_text())
    assert manifest["format_version"] == ARTIFACT_VERSION and len(manifest["layers"]) == 14
    assert (out / "model.safetensors").stat().st_size > 0
    assert "results" in manifest


def test_w2a4_main_job_reports_every_stage(tiny_hf_dir, tmp_path, capsys):
    directory, _, _ = tiny_hf_dir
    out = tmp_path / "out"
    rc = main(["quantize", "--model", str(directory), "--windows", "2", "--seq-len", "32", "--out", str(out),
               "--json", "--steps", "2", "--block-steps", "1", "--tokens", "256", "--calib-seq-len", "32",
               "--activation-bits", "4", "--act-steps", "3"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{\n"):])
    ppl = results["perplexity"]["python-docs (default)"]
    assert {"fp", "ptq", "2bit", "a4-maxabs", "w2a4"} <= set(ppl)
    assert results["distill_activations"]["quantizers"] == 8  # 2 layers x (q/k/v, o, gate/up, down)
    assert 0 < results["distill_activations"]["clip_ratio_min"] <= results["distill_activations"]["clip_ratio_max"] < 1
    assert (out.with_name("out-run") / "stage3-activations" / "metrics.jsonl").is_file()
    assert (out.with_name("out-run") / "stage2-weights" / "metrics.jsonl").is_file()
    assert json.loads((out / "dbllm.json").read_text())["config"]["activation_bits"] == 4


def test_no_distill_is_post_training_only(tiny_hf_dir, tmp_path, capsys):
    directory, _, _ = tiny_hf_dir
    rc = main(["quantize", "--model", str(directory), "--windows", "1", "--seq-len", "32",
               "--out", str(tmp_path / "o"), "--json", "--no-distill"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{\n"):])
    assert "distill" not in results and "ptq" not in results["perplexity"]["python-docs (default)"]


def test_no_distill_w2a4_reports_the_naive_baseline(tiny_hf_dir, tmp_path, capsys):
    directory, _, _ = tiny_hf_dir
    rc = main(["quantize", "--model", str(directory), "--windows", "1", "--seq-len", "32",
               "--out", str(tmp_path / "o"), "--json", "--no-distill", "--activation-bits", "4"])
    assert rc == 0
    stdout = capsys.readouterr().out
    ppl = json.loads(stdout[stdout.index("{\n"):])["perplexity"]["python-docs (default)"]
    assert {"2bit", "a4-maxabs", "w2a4"} <= set(ppl)
    config = json.loads((tmp_path / "o" / "dbllm.json").read_text())["config"]
    assert (config["activation_bits"], config["activation_group_size"]) == (4, 64)  # the CLI's default


def test_act_group_size_is_checked_early(tiny_hf_dir, capsys):
    rc = main(["quantize", "--model", "no-such-model", "--act-group-size", "32"])
    assert rc == 2 and "--activation-bits 4" in capsys.readouterr().err
    directory, _, _ = tiny_hf_dir  # hidden size 64: 48 does not divide it; fails before any evaluation
    rc = main(["quantize", "--model", str(directory), "--no-default-text", "--activation-bits", "4",
               "--act-group-size", "48"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "activation group size 48" in err and "K=64" in err


def test_bad_config_is_a_clear_error_before_loading(capsys):
    rc = main(["quantize", "--model", "no-such-model", "--group-size", "60"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "group_size" in err and "multiple of 8" in err


def test_weights_from_needs_the_w2a4_pipeline(capsys):
    rc = main(["quantize", "--model", "no-such-model", "--weights-from", "run-dir"])
    assert rc == 2
    assert "--activation-bits 4" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    rc = main(["quantize", "--model", "no-such-model", "--no-default-text"])
    assert rc == 2
    assert "no-such-model" in capsys.readouterr().err


def test_generate_through_the_backend(tiny_hf_dir, capsys):
    directory, _, _ = tiny_hf_dir
    rc = main(["generate", "--model", str(directory), "--prompt", "the quick", "--max-new-tokens", "4",
               "--init", "maxabs", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 4 or out["decode_steps"] < 3  # may stop early at eos
    assert out["backend_stats"]["linears_rewritten"] == 28  # prefill + decode graphs, 14 each


def test_bench_compares_with_the_baseline(tiny_hf_dir, capsys):
    directory, _, _ = tiny_hf_dir
    rc = main(["bench", "--model", str(directory), "--prompt-len", "8", "--new-tokens", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("baseline", "dbllm"):
        assert out[name]["decode_tokens_per_s"] > 0 and out[name]["prefill_tokens_per_s"] > 0
    assert out["dbllm"]["backend_stats"]["linears_rewritten"] == 28


def test_rotation_block_reaches_the_config(tiny_hf_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", "no-such-model", "--rotation-block", "48"])
    assert rc == 2  # checked by DBLLMConfig before the model is loaded
    err = capsys.readouterr().err
    assert "rotation_block must be 0" in err and "or a power of two" in err and "48" in err
    directory, _, _ = tiny_hf_dir
    out = tmp_path / "o"
    rc = main(["quantize", "--model", str(directory), "--no-default-text", "--out", str(out), "--json",
               "--no-distill", "--rotation-block", "32"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert json.loads(stdout[stdout.index("{\n"):])["config"]["rotation_block"] == 32
    assert json.loads((out / "dbllm.json").read_text())["config"]["rotation_block"] == 32  # default 0


def test_block_sequences_and_gen_batch_size_reach_the_pipeline(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    import dbllm_compile.distill.calibration as calibration
    import dbllm_compile.distill.block_stage as block_stage

    specs, teacher_rows = [], []
    generate = calibration.generate_calibration

    def recording_generate(model, spec, **kwargs):
        specs.append(spec)
        return generate(model, spec, **{**kwargs, "cache": False})  # really generate, in batches of spec's

    capture = block_stage.capture

    def recording_capture(gm, args, *rest, **kwargs):
        if kwargs.get("dense"):  # the block-wise stage's teacher pass, one call per block-wise batch
            teacher_rows.append(args[0].shape[0])
        return capture(gm, args, *rest, **kwargs)

    monkeypatch.setattr(calibration, "generate_calibration", recording_generate)
    monkeypatch.setattr(block_stage, "capture", recording_capture)
    directory, _, _ = tiny_hf_dir
    rc = main(["quantize", "--model", str(directory), "--no-default-text", "--out", str(tmp_path / "o"), "--json",
               "--steps", "1", "--block-steps", "1", "--tokens", "256", "--calib-seq-len", "32",
               "--batch-size", "2", "--gen-batch-size", "3", "--block-sequences", "4"])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{\n"):])
    assert [(s.num_sequences, s.batch_size) for s in specs] == [(8, 3)]  # default: min(8, 64) on CPU
    assert results["calibration"]["tokens"] == 256  # all 8 sequences for the end-to-end stage
    assert results["distill"]["config"]["block_sequences"] == 4
    assert teacher_rows == [2, 2]  # the first 4 of 8 sequences, in block-wise batches of 2


def test_default_rotation_block_fits_the_model_and_is_off_without_distillation():
    from rich.console import Console

    from dbllm_compile.cli.quantize import DEFAULT_ROTATION_BLOCK, _fit_rotation_block
    from dbllm_compile.config import DBLLMConfig

    quiet = Console(file=open(os.devnull, "w"))
    cfg = DBLLMConfig(rotation_block=DEFAULT_ROTATION_BLOCK)
    fits = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 8))
    assert _fit_rotation_block(cfg, fits, quiet).rotation_block == 32  # gcd(128, 96) = 32
    odd = torch.nn.Sequential(torch.nn.Linear(100, 8))
    assert _fit_rotation_block(cfg, odd, quiet).rotation_block == 0  # 100 = 4 * 25: below 8, none
    assert _fit_rotation_block(cfg, torch.nn.Linear(576, 8), quiet).rotation_block == 64



def test_calibration_only_fills_the_cache_that_the_full_run_reads(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DBLLM_CACHE", str(tmp_path / "cache"))
    directory, _, _ = tiny_hf_dir
    data_args = ["--tokens", "256", "--calib-seq-len", "32", "--gen-batch-size", "4", "--device", "cpu"]
    rc = main(["quantize", "--model", str(directory), "--calibration-only", "--json", *data_args])
    assert rc == 0
    stdout = capsys.readouterr().out
    first = json.loads(stdout[stdout.index("{\n"):])
    assert first["from_cache"] is False and first["tokens"] == 256
    assert os.path.dirname(first["cache_path"]) == str(tmp_path / "cache" / "calibration")
    assert not (tmp_path / "o").exists()  # stopped before quantizing: no artifact
    rc = main(["quantize", "--model", str(directory), "--no-default-text", "--out", str(tmp_path / "o"), "--json",
               "--steps", "1", "--block-steps", "1", *data_args])
    assert rc == 0
    stdout = capsys.readouterr().out
    results = json.loads(stdout[stdout.index("{\n"):])
    assert results["calibration"]["from_cache"] is True and results["calibration"]["tokens"] == 256


def test_calibration_only_needs_distillation(capsys):
    rc = main(["quantize", "--model", "no-such-model", "--calibration-only", "--no-distill"])
    assert rc == 2
    assert "drop --no-distill" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_distillation_of_a_few_tokens_on_cuda(tiny_hf_dir, tmp_path, capsys):
    """Regression (H100, torch 2.11, Triton 3.6): with few tokens per step the DAD loss's sum of a
    tensor of ones became a persistent-reduction kernel that Triton failed to compile
    (``PassManager::run failed``; results.md 3.0h). The loss now counts tokens as a number."""
    directory, _, _ = tiny_hf_dir
    rc = main(["quantize", "--model", str(directory), "--no-default-text", "--out", str(tmp_path / "o"),
               "--steps", "2", "--block-steps", "1", "--tokens", "256", "--calib-seq-len", "32",
               "--gen-batch-size", "4", "--device", "cuda", "--compile"])
    assert rc == 0
