"""Exported formats of a deployed model, each loaded back in a fresh process: Hugging Face
(save_pretrained / from_pretrained), .pt2 ExportedProgram, AOTInductor package (CPU), MLIR;
and the ``dbllm-compile export`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.artifact import save_deployed
from dbllm_compile.artifact.mlir import mlir_available


@pytest.fixture(scope="module")
def deployed_llama(tmp_path_factory):
    """A tiny random Llama, deployed and saved, with reference inputs and logits on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    q = dc.quantize(model, (torch.randint(0, 128, (2, 16)),), dc.DBLLMConfig(),
                    example_kwargs={"use_cache": False}, progress=False)
    deployed = dc.convert(q, progress=False)
    root = tmp_path_factory.mktemp("formats")
    ids = torch.randint(0, 128, (3, 11))  # not the export example's shape: dynamic dims are used
    save_file({"ids": ids, "logits": deployed(ids).logits}, str(root / "reference.safetensors"))
    return deployed, root, save_deployed(deployed, root / "art")


def _run_fresh(script: str, *args: str, timeout: int = 240) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"fresh process failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_hf_save_pretrained_and_from_pretrained(deployed_llama):
    from dbllm_compile.artifact.hf import DBLinear, to_hf

    deployed, root, _ = deployed_llama
    hf_model = to_hf(deployed)
    assert sum(isinstance(m, DBLinear) for m in hf_model.modules()) == 14
    hf_model.save_pretrained(str(root / "hf"))
    qc = json.loads((root / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dbllm" and qc["group_size"] == 64 and len(qc["layers"]) == 14
    out = _run_fresh("""
        import sys, torch
        import dbllm_compile                      # registers quant_method "dbllm"
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        from dbllm_compile.artifact.hf import DBLinear
        ref = load_file(sys.argv[2])
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        assert sum(isinstance(m, DBLinear) for m in model.modules()) == 14
        up = model.model.layers[0].mlp.up_proj
        assert up.packed.dtype == torch.uint8 and up.a1.dtype == torch.float16
        assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        gen = model.generate(ref["ids"][:1], max_new_tokens=4, do_sample=False)
        assert gen.shape == (1, ref["ids"].shape[1] + 4)
        print("same outputs")
    """, root / "hf", root / "reference.safetensors")
    assert "same outputs" in out


def test_hf_gpt2_conv1d(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    from dbllm_compile.artifact.hf import to_hf

    ids = torch.randint(0, 100, (2, 16))
    deployed = dc.convert(dc.quantize(tiny_gpt2, (ids,), example_kwargs={"use_cache": False}, progress=False),
                          progress=False)
    to_hf(deployed).save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(loaded(ids).logits, deployed(ids).logits)


def test_pt2_exported_program(deployed_llama):
    from dbllm_compile.artifact.pt2 import save_pt2

    deployed, root, _ = deployed_llama
    path = save_pt2(deployed, root / "model.pt2")
    out = _run_fresh("""
        import sys, torch
        import dbllm_compile                      # defines torch.ops.dbllm.* for the loader
        from safetensors.torch import load_file
        ref = load_file(sys.argv[2])
        ep = torch.export.load(sys.argv[1])
        assert sum(n.target == torch.ops.dbllm.db_linear.default for n in ep.graph.nodes) == 14
        assert len(ep.range_constraints) == 2   # batch and sequence stay dynamic
        assert torch.equal(ep.module()(ref["ids"], use_cache=False).logits, ref["logits"])
        print("same outputs")
    """, path, root / "reference.safetensors")
    assert "same outputs" in out


def test_aoti_cpu_package_runs_without_dbllm_compile(deployed_llama):
    from dbllm_compile.artifact.aoti import aoti_package

    deployed, root, _ = deployed_llama
    path = aoti_package(deployed, root / "aoti.pt2")
    out = _run_fresh("""
        import sys, json
        sys.modules["dbllm_compile"] = None       # the package must not need it
        import torch
        from safetensors.torch import load_file
        ref = load_file(sys.argv[2])
        runner = torch._inductor.aoti_load_package(sys.argv[1])
        meta = runner.get_metadata()
        assert json.loads(meta["dbllm.outputs"]) == ["['logits']"], meta
        (logits,) = runner(ref["ids"])
        # Inductor's C++ reassociates the float32 sums: not bit-exact, float32 rounding apart.
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
        print("same outputs")
    """, path, root / "reference.safetensors")
    assert "same outputs" in out
    # the loader with the libstdc++ workaround (the GPU image's segfault) gives the same runner
    from dbllm_compile.artifact.aoti import load_aoti, promote_libstdcxx

    assert promote_libstdcxx() is None or "libstdc++" in promote_libstdcxx()
    runner = load_aoti(path)
    assert "dbllm.outputs" in runner.get_metadata()
    with pytest.raises(FileNotFoundError, match="no AOTInductor package"):
        load_aoti(root / "missing.pt2")


@pytest.mark.parametrize("codebook", ["binary", "sign"])
def test_decomposition_is_bit_exact(mlp, codebook):
    from dbllm_compile.passes.decompose import decompose_dual_binary

    x = torch.randn(5, 64)
    config = dc.DBLLMConfig(keep_head=False, codebook=codebook)
    deployed = dc.convert(dc.quantize(mlp, (x,), config, progress=False), progress=False)
    ep = decompose_dual_binary(torch.export.export(deployed.graph_module, (x,), strict=False))
    assert not any(str(n.target).startswith("dbllm.") for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), deployed(x))


@pytest.mark.skipif(mlir_available() is not None, reason=str(mlir_available()))
def test_mlir_torch_dialect_keeps_the_named_op(deployed_llama):
    from dbllm_compile.artifact.mlir import to_mlir

    text = str(to_mlir(deployed_llama[0], "torch"))
    assert text.count('torch.operator "torch.dbllm.db_linear"') == 14
    assert "!torch.vtensor<[2,64,8],ui8>" in text  # packed planes stay 2 bits per weight


@pytest.mark.skipif(mlir_available() is not None, reason=str(mlir_available()))
def test_mlir_linalg_computes_the_reference(mlp, tmp_path):
    from dbllm_compile.artifact.mlir import save_mlir

    x = torch.randn(4, 64)
    deployed = dc.convert(dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False), progress=False), progress=False)
    path = save_mlir(deployed, tmp_path / "mlp.mlir", "linalg-on-tensors")
    text = path.read_text()
    assert "linalg.matmul" in text or "linalg.generic" in text
    assert "torch.operator" not in text and "torch.aten" not in text and "torch.vtensor" not in text
    from safetensors.torch import save_file

    save_file({"x": x, "y": deployed(x)}, str(tmp_path / "ref.safetensors"))
    out = _run_fresh("""
        import sys, torch
        from safetensors.torch import load_file
        from dbllm_compile.artifact.mlir import run_linalg
        ref = load_file(sys.argv[2])
        y = run_linalg(sys.argv[1], [ref["x"]])
        torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-6)
        print("same outputs", float((y - ref["y"]).abs().max()))
    """, path, tmp_path / "ref.safetensors")
    assert "same outputs" in out


def test_cli_export(deployed_llama, tmp_path, capsys):
    from dbllm_compile.cli import main

    _, _, artifact = deployed_llama
    assert main(["export", str(artifact), "--format", "safetensors", "--out", str(tmp_path / "copy")]) == 0
    assert main(["export", str(tmp_path / "copy"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    assert (tmp_path / "m.pt2").is_file()
    assert "torch.export.load" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nowhere"), "--format", "pt2"]) == 2
    assert "no such artifact directory" in capsys.readouterr().err
