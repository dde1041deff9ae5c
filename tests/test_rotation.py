"""rotation_block: the Hadamard input rotation (reference, op, pass, convert, artifacts, resume)."""

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.config import DBLLMConfig
from dbllm_compile.distill.blocks import capture
from dbllm_compile.errors import ConfigError, DBLLMError
from dbllm_compile.ops import ACT_QUANT_TRAIN_OP, HADAMARD_OP, TRAIN_OP
from dbllm_compile.passes.graph_analysis import _through_views
from dbllm_compile.reference.rotation import hadamard_matrix, rotate, rotate_weight


def _nodes(model, op):
    return [n for n in model.graph_module.graph.nodes if n.op == "call_function" and n.target == op]


def _ids(b, t, seed=0):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", [2, 8, 64])
def test_hadamard_matrix_is_symmetric_orthonormal_and_sylvester(block):
    h = hadamard_matrix(block).double()
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.abs(), torch.full_like(h, block**-0.5), rtol=1e-7, atol=0)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / 2**0.5
    half = hadamard_matrix(block // 2).double() if block > 2 else torch.ones(1, 1, dtype=torch.float64)
    torch.testing.assert_close(h, torch.kron(h2, half), rtol=0, atol=1e-7)  # Sylvester


def test_rotation_against_a_dense_block_diagonal_matrix():
    x = torch.randn(3, 5, 192, dtype=torch.float64)
    q = torch.block_diag(*[hadamard_matrix(64).double()] * 3)
    torch.testing.assert_close(rotate(x.float(), 64).double(), x @ q, rtol=0, atol=1e-5)
    w = torch.randn(40, 192)
    torch.testing.assert_close(rotate(x.float(), 64) @ rotate_weight(w, 64).T, x.float() @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotate(rotate(x.float(), 64), 64), x.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_op_is_the_reference_and_its_gradient_is_the_rotation(dtype):
    x = torch.randn(2, 7, 128).to(dtype).requires_grad_()
    y = torch.ops.dbllm.hadamard(x, 32)
    assert y.dtype == dtype and torch.equal(y, rotate(x.detach(), 32))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, rotate(g, 32))
    x64 = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.dbllm.hadamard(t, 8), (x64,))


def test_op_rejects_a_block_that_does_not_divide_k():
    with pytest.raises(ValueError, match="not divisible by block_size=64"):
        torch.ops.dbllm.hadamard(torch.randn(2, 96), 64)


@pytest.mark.parametrize("bad", [-1, 1, 3, 48, True, 64.0])
def test_config_rejects_blocks_that_are_not_powers_of_two(bad):
    with pytest.raises(ConfigError, match="rotation_block must be 0 .* or a power of two"):
        DBLLMConfig(rotation_block=bad)


def test_config_round_trip_and_old_dicts():
    cfg = DBLLMConfig(rotation_block=64)
    assert DBLLMConfig.from_dict(cfg.to_dict()) == cfg
    old = DBLLMConfig().to_dict()
    del old["rotation_block"]
    assert DBLLMConfig.from_dict(old).rotation_block == 0


def _rotated_llama(tiny_llama, **kw):
    cfg = DBLLMConfig(rotation_block=kw.pop("block", 64), **kw)
    return dc.quantize(tiny_llama, (_ids(2, 16),), example_kwargs={"use_cache": False}, config=cfg, progress=False)


def test_llama_siblings_share_one_rotation_and_the_graph_is_exact_in_full_precision(tiny_llama):
    q = _rotated_llama(tiny_llama)
    groups = [sorted(w.split(".")[-2] for w in r.layers) for r in q.report.rotations]
    assert groups == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    rot = _nodes(q, HADAMARD_OP)
    assert len(rot) == 8 and all(n.args[1] == 64 for n in rot)
    assert all(_through_views(n.args[0]).target == HADAMARD_OP for n in _nodes(q, TRAIN_OP))
    # latent weights hold W @ Q
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q.graph_module.get_parameter("model.layers.0.self_attn.q_proj.weight"),
                               rotate_weight(w.detach(), 64), rtol=0, atol=0)
    # dense evaluation (latent weights, no quantization) reproduces the original model
    ids = _ids(2, 16, seed=1)
    out = next(n for n in q.graph_module.graph.nodes if n.op == "output").args[0][0]
    dense = capture(q.graph_module, (ids,), q.fixed_kwargs, [out.name])[out.name]
    torch.testing.assert_close(dense, tiny_llama(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert "Hadamard input rotation" in q.report.summary()


def test_activation_quantizers_sit_after_the_rotation(tiny_llama):
    q = _rotated_llama(tiny_llama, activation_bits=4, activation_group_size=32)
    acts = _nodes(q, ACT_QUANT_TRAIN_OP)
    assert len(acts) == 8 and all(a.args[0].target == HADAMARD_OP for a in acts)
    assert all(_through_views(n.args[0]).target == ACT_QUANT_TRAIN_OP for n in _nodes(q, TRAIN_OP))
    # added later (stage 3 of W(1+1)A4): same placement
    q2 = dc.add_activation_quant(_rotated_llama(tiny_llama), group_size=32)
    assert [a.args[0].target for a in _nodes(q2, ACT_QUANT_TRAIN_OP)] == [HADAMARD_OP] * 8


def test_rotated_quantization_differs_but_trains_and_converts(tiny_llama):
    ids = _ids(2, 16, seed=2)
    q = _rotated_llama(tiny_llama, activation_bits=4, activation_group_size=32)
    plain = dc.quantize(tiny_llama, (_ids(2, 16),), example_kwargs={"use_cache": False},
                        config=DBLLMConfig(activation_bits=4, activation_group_size=32), progress=False)
    logits = q(ids).logits
    with torch.no_grad():
        assert not torch.allclose(logits, plain(ids).logits)
    logits.float().square().mean().backward()
    w = q.graph_module.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert w.grad is not None and w.grad.abs().sum() > 0  # through the rotation and the quantizer
    deployed = dc.convert(q, progress=False)
    assert len(_nodes(deployed, HADAMARD_OP)) == 8
    with torch.no_grad():
        torch.testing.assert_close(deployed(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)


def test_block_that_does_not_divide_k_names_the_layer(tiny_llama):
    with pytest.raises(ConfigError, match=r"rotation_block=128 does not divide .*model\.layers\.0\.self_attn\.q_proj.*K=64"):
        _rotated_llama(tiny_llama, block=128)


def test_decomposition_and_pt2_round_trip_are_exact(mlp, tmp_path):
    from dbllm_compile.artifact import load_deployed, save_deployed
    from dbllm_compile.passes.decompose import decompose_dual_binary

    x = torch.randn(5, 64)
    cfg = DBLLMConfig(keep_head=False, rotation_block=32)
    deployed = dc.convert(dc.quantize(mlp, (x,), cfg, progress=False), progress=False)
    ep = decompose_dual_binary(torch.export.export(deployed.graph_module, (x,), strict=False))
    assert not any(str(n.target).startswith("dbllm.") for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), deployed(x), rtol=0, atol=0)
    loaded = load_deployed(save_deployed(deployed, tmp_path / "art"), model=mlp)
    assert loaded.config.rotation_block == 32 and len(_nodes(loaded, HADAMARD_OP)) == 3
    assert torch.equal(loaded(x), deployed(x))


def test_hugging_face_export_carries_the_rotation(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from dbllm_compile.artifact.hf import DBLinear, to_hf

    ids = _ids(2, 16, seed=5)
    deployed = dc.convert(_rotated_llama(tiny_llama), progress=False)
    hf = to_hf(deployed, tiny_llama)
    assert all(m.rotation_block == 64 for m in hf.modules() if isinstance(m, DBLinear))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, deployed(ids).logits, rtol=1e-5, atol=1e-5)
    hf.save_pretrained(str(tmp_path))
    qc = hf.config.quantization_config
    assert qc.format_version == 3 and qc.layers["model.layers.0.mlp.up_proj"]["rotation_block"] == 64
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)


def test_a_checkpoint_of_an_unrotated_run_is_refused(tiny_llama, tmp_path):
    from dbllm_compile.distill import DistillConfig, distill

    data = _ids(4, 16, seed=3)
    cfg = DistillConfig(steps=2, block_steps=1, batch_size=2, block_batch_size=2, checkpoint_every=1)
    plain = dc.quantize(tiny_llama, (_ids(2, 16),), example_kwargs={"use_cache": False}, progress=False)
    distill(plain, tiny_llama, data, cfg, out_dir=tmp_path, progress=False, plots=False)
    with pytest.raises(DBLLMError, match="rotation_block.*same settings"):
        distill(_rotated_llama(tiny_llama), tiny_llama, data, cfg, out_dir=tmp_path, progress=False, plots=False)


def test_compiled_rotated_training_step_matches_eager_with_the_rotation_decomposed(tiny_llama):
    from dbllm_compile.backends.dynamo import reset_stats, stats

    ids = _ids(2, 16, seed=4)
    student = _rotated_llama(tiny_llama, init="maxabs")
    scales = list(student.scale_parameters())
    eager_loss = student(ids).logits.square().mean()
    eager_grads = torch.autograd.grad(eager_loss, scales)
    torch._dynamo.reset()
    reset_stats()
    compiled = torch.compile(student, backend="dbllm", fullgraph=True, options={"decompose_train": True})
    loss = compiled(ids).logits.square().mean()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    loss.backward()
    for s, g in zip(scales, eager_grads):
        torch.testing.assert_close(s.grad, g, rtol=1e-3, atol=1e-6)
    assert stats().ops_lowered == {"db_linear_train:decomposed": 14, "hadamard:decomposed": 8}
    torch._dynamo.reset()
