"""Both 2-bit weight codebooks end to end: config, quantize -> convert -> artifact / HF / pt2,
the torch.compile backend, and the sign form against its fake-quantized training form."""

from __future__ import annotations

import json

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.artifact import load_deployed, load_layers, save_deployed
from dbllm_compile.artifact.format import ARTIFACT_VERSION, MANIFEST_FILE, seal_manifest
from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ConfigError
from dbllm_compile.ops import DEPLOY_OP, TRAIN_OP, op_arguments
from dbllm_compile.passes.linear_match import get_attr_value
from dbllm_compile.reference.dual_binary import fake_quantize_weight

CODEBOOKS = ["binary", "sign"]
G = 32


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _quantize(model, codebook, **kwargs):
    return dc.quantize(model, (torch.randint(0, 128, (2, 16)),), DBLLMConfig(codebook=codebook, group_size=G, **kwargs),
                       example_kwargs={"use_cache": False}, progress=False)


@pytest.fixture(scope="module", params=CODEBOOKS)
def deployed_pair(request):
    """``(codebook, source model, train-stage model, deployed model, ids)``, one per codebook."""
    model = _llama()
    q = _quantize(model, request.param)
    return request.param, model, q, dc.convert(q, progress=False), torch.randint(0, 128, (3, 11))


# ------------------------------------------------------------------ config

def test_codebook_is_validated_and_round_trips():
    assert DBLLMConfig().codebook == "binary"
    cfg = DBLLMConfig(codebook="sign")
    assert DBLLMConfig.from_dict(cfg.to_dict()) == cfg and cfg.scales_per_group == 3
    with pytest.raises(ConfigError, match=r"DBLLMConfig.codebook must be one of \['binary', 'sign'\], got 'ternary'"):
        DBLLMConfig(codebook="ternary")


def test_config_dict_written_before_the_codebook_field_loads_as_binary():
    old = {k: v for k, v in DBLLMConfig(group_size=128).to_dict().items() if k not in ("codebook", "activation_bits")}
    cfg = DBLLMConfig.from_dict(old)
    assert cfg.codebook == "binary" and cfg.activation_bits == 16 and cfg.group_size == 128


# ------------------------------------------------------------------ quantize / convert

def test_train_and_deploy_forms_carry_the_offset_only_for_sign(deployed_pair):
    codebook, _, q, d, ids = deployed_pair
    train_nodes = [n for n in q.graph_module.graph.nodes if n.target == TRAIN_OP]
    deploy_nodes = [n for n in d.graph_module.graph.nodes if n.target == DEPLOY_OP]
    assert len(train_nodes) == len(deploy_nodes) == 14
    has_c = {op_arguments(n)["c"] is not None for n in train_nodes + deploy_nodes}
    assert has_c == {codebook == "sign"}
    if codebook == "binary":  # the {0,1} form keeps the seven-argument calls of older graphs
        assert {len(n.args) for n in train_nodes + deploy_nodes} == {7}
    assert len(list(q.scale_parameters())) == 14 * (3 if codebook == "sign" else 2)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, d(ids).logits)
    # G=32, fp16 scales: 2 bits + 16 * (2 or 3) / 32
    assert d.size_report().bits_per_weight == pytest.approx(3.5 if codebook == "sign" else 3.0)
    assert q.size_report().quantized_bytes == d.size_report().quantized_bytes


def test_sign_init_is_symmetric_and_lowers_the_error_of_the_binary_init():
    model = _llama()
    binary, sign = _quantize(model, "binary"), _quantize(model, "sign")
    gm = sign.graph_module
    weight = "model.layers.0.mlp.down_proj.weight"
    a1, a2, c = (gm.get_parameter(f"{weight}_{p}") for p in ("a1", "a2", "c"))
    torch.testing.assert_close(c, -(a1 + a2) / 2)  # c = -s_hi, a1 + a2 = 2 s_hi
    mse = {r.name: r.init_mse for r in sign.report.rewritten}
    assert sum(mse.values()) < sum(r.init_mse for r in binary.report.rewritten)


def test_sign_deploy_matches_the_fake_quantized_training_form():
    """The deployed sign model = the source model with every quantized weight replaced by its
    fake-quantized value (nearest level of w - c with the fp16-rounded a1, a2, c)."""
    model = _llama()
    q = _quantize(model, "sign", init_refine_iters=1)
    with torch.no_grad():  # move the parameters off their init, as training would
        for p in q.scale_parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    d = dc.convert(q, progress=False)
    fake = _llama()
    gm = q.graph_module
    with torch.no_grad():
        for layer in q.report.rewritten:
            w = gm.get_parameter(layer.weight)
            a1, a2, c = (gm.get_parameter(f"{layer.weight}_{p}").half().float() for p in ("a1", "a2", "c"))
            fake.get_parameter(layer.weight).copy_(fake_quantize_weight(w, a1, a2, G, c))
        ids = torch.randint(0, 128, (2, 13))
        torch.testing.assert_close(d(ids).logits, fake(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ artifacts

def test_artifact_round_trip_is_identical(deployed_pair, tmp_path):
    codebook, _, _, d, ids = deployed_pair
    path = save_deployed(d, tmp_path / "art")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == ARTIFACT_VERSION == 3 and manifest["config"]["codebook"] == codebook
    assert all(("c" in layer) == (codebook == "sign") for layer in manifest["layers"])
    loaded = load_deployed(path)
    assert loaded.config.codebook == codebook
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, d(ids).logits)
    layers = load_layers(path)
    offsets = {name: entry[4] for name, entry in layers.items()}
    assert all((c is not None) == (codebook == "sign") for c in offsets.values())
    if codebook == "sign":
        name = manifest["layers"][0]["weight"]
        assert torch.equal(offsets[name], get_attr_value(d.graph_module, manifest["layers"][0]["c"]))


def test_version_2_artifact_still_loads(tmp_path):
    """An artifact as the previous release wrote it: format version 2 ({0,1} codebook only), no
    codebook in the config."""
    d = dc.convert(_quantize(_llama(), "binary"), progress=False)
    ids = torch.randint(0, 128, (3, 11))
    path = save_deployed(d, tmp_path / "art")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 2
    del manifest["config"]["codebook"]
    (path / MANIFEST_FILE).write_text(json.dumps(seal_manifest(manifest)))
    loaded = load_deployed(path)
    assert loaded.config.codebook == "binary"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, d(ids).logits)


def test_hugging_face_round_trip(deployed_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from dbllm_compile.artifact.hf import to_hf

    codebook, _, _, d, ids = deployed_pair
    to_hf(d).save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    proj = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert (proj.c is not None) == (codebook == "sign")
    assert loaded.config.quantization_config.format_version == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, d(ids).logits)


def test_pt2_round_trip(deployed_pair, tmp_path):
    from dbllm_compile.artifact.pt2 import save_pt2

    codebook, _, _, d, ids = deployed_pair
    save_pt2(d, tmp_path / "m.pt2")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == DEPLOY_OP]
    assert len(nodes) == 14 and {op_arguments(n)["c"] is not None for n in nodes} == {codebook == "sign"}
    with torch.no_grad():
        assert torch.equal(ep.module()(ids, use_cache=False).logits, d(ids).logits)


# ------------------------------------------------------------------ torch.compile backend

def test_compile_backend_lowers_and_quantizes_the_sign_codebook(deployed_pair):
    from dbllm_compile.backends.dynamo import reset_stats

    codebook, model, _, d, ids = deployed_pair
    torch._dynamo.reset()
    reset_stats()
    with torch.no_grad():
        lowered = torch.compile(d, backend="dbllm", fullgraph=True, options={"inductor": False})(ids).logits
        assert torch.equal(lowered, d(ids).logits)
        torch._dynamo.reset()
        on_the_fly = torch.compile(model, backend="dbllm", fullgraph=True,
                                   options={"inductor": False, "codebook": codebook, "group_size": G})
        assert torch.equal(on_the_fly(ids, use_cache=False).logits, d(ids).logits)
    torch._dynamo.reset()


def test_cli_accepts_the_codebook_flag():
    import argparse

    from dbllm_compile.cli import quantize as cli_quantize

    sub = argparse.ArgumentParser().add_subparsers()
    parser = cli_quantize.add_parser(sub)
    assert parser.parse_args(["--codebook", "sign"]).codebook == "sign"
    assert parser.parse_args([]).codebook == "binary"
    with pytest.raises(SystemExit):
        parser.parse_args(["--codebook", "ternary"])


def test_aoti_gpu_rewrite_adds_the_offset_after_the_kernel_op():
    """``use_gpu_kernels`` (the CUDA AOTInductor path) on CPU: ``db_linear_gpu`` falls back to its
    torch reference there, the offset term is appended as plain torch ops. fp16: two roundings
    (kernel output, then the sum) against the reference's one, so 2 ulps of max |y|."""
    pytest.importorskip("triton")
    import copy

    from dbllm_compile.artifact.aoti import use_gpu_kernels
    from dbllm_compile.reference.linear import add_offset_term

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96)).eval().half()
    x = torch.randn(5, 64).half()
    d = dc.convert(dc.quantize(mlp, (x,), DBLLMConfig(keep_head=False, codebook="sign"), progress=False), progress=False)
    gm = copy.deepcopy(d.graph_module)
    assert use_gpu_kernels(gm, torch.float16) == 2
    assert sum(n.target is add_offset_term for n in gm.graph.nodes) == 2
    with torch.no_grad():
        y, ref = gm(x), d(x)
    ulp = float(ref.abs().max()) * torch.finfo(torch.float16).eps
    torch.testing.assert_close(y, ref, rtol=0, atol=2 * ulp)
