"""activation_bits=4: one quantized activation per shared input, numerics, convert, training."""

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ConfigError
from dbllm_compile.ops import ACT_QUANT_OP, ACT_QUANT_TRAIN_OP, DEPLOY_OP, TRAIN_OP
from dbllm_compile.passes.graph_analysis import _through_views
from dbllm_compile.reference.activation import clip_ratio_from_logit, fake_quantize_activation
from dbllm_compile.reference.linear import db_linear_train_reference

A4 = DBLLMConfig(activation_bits=4)


def _nodes(model, op):
    return [n for n in model.graph_module.graph.nodes if n.op == "call_function" and n.target == op]


def _ids(b, t, seed=0):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def _llama(tiny_llama, config=A4):
    return dc.quantize(tiny_llama, (_ids(2, 16),), example_kwargs={"use_cache": False},
                       config=config, progress=False)


def _mlp_reference(gm, x, group_size=0):
    """The quantized 3-linear MLP of the ``mlp`` fixture in reference ops: each linear's input
    fake-quantized with its own clip factor, GELU after the first two."""
    h = x
    for i, act in ((0, True), (2, True), (4, False)):
        r = clip_ratio_from_logit(gm.get_parameter(f"{i}.weight_act_clip"))
        h = db_linear_train_reference(fake_quantize_activation(h, r, group_size), gm.get_parameter(f"{i}.weight"),
                                      gm.get_parameter(f"{i}.weight_a1"), gm.get_parameter(f"{i}.weight_a2"),
                                      gm.get_parameter(f"{i}.bias"), 64, torch.float16)
        if act:
            h = torch.nn.functional.gelu(h)
    return h


def test_llama_siblings_share_one_quantized_activation(tiny_llama):
    q = _llama(tiny_llama)
    quantizers = q.report.activation_quantizers
    groups = [sorted(w.split(".")[-2] for w in a.layers) for a in quantizers]
    assert groups == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    act_nodes = _nodes(q, ACT_QUANT_TRAIN_OP)
    assert len(act_nodes) == 8 and len(list(q.activation_parameters())) == 8
    # every linear reads an act_quant node (possibly through views), and each clip is distinct
    linears = _nodes(q, TRAIN_OP)
    assert len(linears) == 14
    assert all(_through_views(n.args[0]).target == ACT_QUANT_TRAIN_OP for n in linears)
    readers = {a.name: sum(_through_views(n.args[0]) is a for n in linears) for a in act_nodes}
    assert sorted(readers.values()) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert len({a.args[1].target for a in act_nodes}) == 8
    assert "activation quantizer" in q.report.summary()


def test_no_siblings_each_linear_has_its_own(mlp):
    q = dc.quantize(mlp, (torch.randn(3, 64),), config=DBLLMConfig(activation_bits=4, keep_head=False),
                    progress=False)
    assert [a.layers for a in q.report.activation_quantizers] == [["0.weight"], ["2.weight"], ["4.weight"]]
    assert len(_nodes(q, ACT_QUANT_TRAIN_OP)) == 3


def test_mlp_output_matches_reference_composition(mlp):
    q = dc.quantize(mlp, (torch.randn(3, 64),), config=DBLLMConfig(activation_bits=4, keep_head=False),
                    progress=False)
    gm = q.graph_module
    for p in q.activation_parameters():  # distinct ratios per layer
        p.data.fill_(float(torch.randn(())))
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), _mlp_reference(gm, x), rtol=0, atol=0)


def test_activation_bits_16_inserts_nothing(tiny_llama):
    q = _llama(tiny_llama, DBLLMConfig())
    assert not _nodes(q, ACT_QUANT_TRAIN_OP) and not q.report.activation_quantizers


def test_convert_keeps_activation_quant_and_is_bit_identical(tiny_llama):
    q = _llama(tiny_llama)
    for p in q.activation_parameters():
        p.data.fill_(1.0)
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        before = q(ids, use_cache=False).logits
    d = dc.convert(q, progress=False)
    assert len(_nodes(d, ACT_QUANT_OP)) == 8 and not _nodes(d, ACT_QUANT_TRAIN_OP)
    assert len(_nodes(d, DEPLOY_OP)) == 14
    buffers = dict(d.graph_module.named_buffers())
    ratio = buffers["model.layers.0.self_attn.q_proj.weight_act_clip_ratio"]
    assert ratio.dtype == torch.float32 and ratio.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert not any(n.endswith("_act_clip") for n, _ in d.graph_module.named_parameters())
    with torch.no_grad():
        after = d(ids, use_cache=False).logits
    assert torch.equal(before, after)


def test_training_updates_clip_factors(tiny_llama):
    q = _llama(tiny_llama)
    clips = list(q.activation_parameters())
    before = [c.detach().clone() for c in clips]
    ids = _ids(2, 8, seed=5)
    logits = q(ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(c.grad is not None and torch.isfinite(c.grad) for c in clips)
    torch.optim.SGD(clips, lr=1.0).step()
    assert all(not torch.equal(b, c) for b, c in zip(before, clips))


def test_config_activation_bits_validated_and_old_dicts_load():
    with pytest.raises(ConfigError, match="activation_bits"):
        DBLLMConfig(activation_bits=8)
    old = DBLLMConfig().to_dict()
    del old["activation_bits"]
    assert DBLLMConfig.from_dict(old).activation_bits == 16
    assert DBLLMConfig.from_dict(A4.to_dict()) == A4


def test_saved_artifact_keeps_trained_clip_ratios(tiny_llama, tmp_path):
    from dbllm_compile.artifact import load_deployed, save_deployed
    from dbllm_compile.errors import ArtifactError
    from dbllm_compile.artifact.hf import to_hf

    q = _llama(tiny_llama)
    for p in q.activation_parameters():
        p.data.fill_(0.3)  # not the default init: the loaded ratios must come from the artifact
    d = dc.convert(q, progress=False)
    loaded = load_deployed(save_deployed(d, tmp_path / "art"))
    ids = _ids(3, 11, seed=7)
    assert len(_nodes(loaded, ACT_QUANT_OP)) == 8
    assert torch.equal(d(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)
    with pytest.raises(ArtifactError, match="activation_bits=16"):
        to_hf(d)


def test_gpt2_addmm_reads_quantized_activation_through_its_view(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    q = dc.quantize(tiny_gpt2, (ids,), example_kwargs={"use_cache": False}, config=A4, progress=False)
    linears = _nodes(q, TRAIN_OP)
    assert len(linears) == 8 and len(q.report.activation_quantizers) == 8  # fused c_attn: no siblings
    assert all(_through_views(n.args[0]).target == ACT_QUANT_TRAIN_OP for n in linears)
    # addmm reads a 2-D view of the [B, T, C] activation: the view chain was copied after the quantizer
    assert sum(n.args[0].target != ACT_QUANT_TRAIN_OP for n in linears) >= 4
    with torch.no_grad():
        before = q(ids, use_cache=False).logits
        after = dc.convert(q, progress=False)(ids, use_cache=False).logits
    assert torch.isfinite(before).all() and torch.equal(before, after)


# ---- activation_group_size: one scale per token and group of G input features ----

A4G = DBLLMConfig(activation_bits=4, activation_group_size=32)


def _group_sizes(model, op):
    from dbllm_compile.ops import op_arguments

    return [op_arguments(n)["group_size"] for n in _nodes(model, op)]


def test_pass_inserts_quantizers_with_the_configured_group_size(tiny_llama):
    q = _llama(tiny_llama, A4G)
    quantizers = q.report.activation_quantizers
    groups = [sorted(w.split(".")[-2] for w in a.layers) for a in quantizers]
    assert groups == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    assert [(a.group_size, a.in_features) for a in quantizers] == [(32, 64), (32, 64), (32, 64), (32, 128)] * 2
    assert _group_sizes(q, ACT_QUANT_TRAIN_OP) == [32] * 8
    # the per-token default keeps the two-argument call of graphs from before the argument existed
    q0 = _llama(tiny_llama)
    assert all(len(n.args) == 2 for n in _nodes(q0, ACT_QUANT_TRAIN_OP))
    assert _group_sizes(q0, ACT_QUANT_TRAIN_OP) == [0] * 8


def test_group_size_changes_the_function_and_convert_carries_it(tiny_llama):
    q = _llama(tiny_llama, A4G)
    q0 = _llama(tiny_llama)
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        before = q(ids, use_cache=False).logits
        assert not torch.equal(before, q0(ids, use_cache=False).logits)
    d = dc.convert(q, progress=False)
    assert _group_sizes(d, ACT_QUANT_OP) == [32] * 8 and not _nodes(d, ACT_QUANT_TRAIN_OP)
    assert d.config.activation_group_size == 32
    with torch.no_grad():
        assert torch.equal(before, d(ids, use_cache=False).logits)


def test_group_size_mlp_matches_reference_composition(mlp):
    q = dc.quantize(mlp, (torch.randn(3, 64),), progress=False,
                    config=DBLLMConfig(activation_bits=4, activation_group_size=32, keep_head=False))
    gm = q.graph_module
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), _mlp_reference(gm, x, 32), rtol=0, atol=0)


def test_group_size_training_updates_clip_factors(tiny_llama):
    q = _llama(tiny_llama, A4G)
    clips = list(q.activation_parameters())
    ids = _ids(2, 8, seed=5)
    logits = q(ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
    assert all(c.grad is not None and torch.isfinite(c.grad) and c.grad != 0 for c in clips)


def test_group_size_not_dividing_k_is_a_clear_error(tiny_llama, mlp):
    with pytest.raises(ConfigError, match=r"activation_group_size=48 does not divide.*K=64.*or 0"):
        _llama(tiny_llama, DBLLMConfig(activation_bits=4, activation_group_size=48))
    # the mlp's last layer reads 96 features: 64 divides the others but not that one
    with pytest.raises(ConfigError, match=r"4 \(K=96"):
        dc.quantize(mlp, (torch.randn(3, 64),), progress=False,
                    config=DBLLMConfig(activation_bits=4, activation_group_size=64, keep_head=False))
    q = _llama(tiny_llama, DBLLMConfig())
    with pytest.raises(ConfigError, match=r"activation group size 48 does not divide the input features K=64 "
                                          r"of model.layers.0.self_attn.q_proj, .*k_proj"):
        dc.add_activation_quant(q, group_size=48)
    assert not _nodes(q, ACT_QUANT_TRAIN_OP) and q.config.activation_bits == 16  # unchanged
    with pytest.raises(ConfigError, match="activation_group_size must be an int >= 0"):
        DBLLMConfig(activation_group_size=-1)
    with pytest.raises(ConfigError, match="activation_group_size must be an int >= 0"):
        DBLLMConfig(activation_group_size=True)


def test_add_activation_quant_takes_the_group_size(tiny_llama):
    q = dc.add_activation_quant(_llama(tiny_llama, DBLLMConfig()), group_size=16)
    assert q.config.activation_bits == 4 and q.config.activation_group_size == 16
    assert _group_sizes(q, ACT_QUANT_TRAIN_OP) == [16] * 8
    # default: the config's value (0 unless set)
    q = dc.add_activation_quant(_llama(tiny_llama, DBLLMConfig(activation_group_size=32)))
    assert q.config.activation_group_size == 32 and _group_sizes(q, ACT_QUANT_TRAIN_OP) == [32] * 8
    q = dc.add_activation_quant(_llama(tiny_llama, DBLLMConfig()))
    assert q.config.activation_group_size == 0 and _group_sizes(q, ACT_QUANT_TRAIN_OP) == [0] * 8


def test_distill_w2a4_checks_the_group_size_before_training(tiny_llama):
    from dbllm_compile.distill import distill_w2a4

    q = _llama(tiny_llama, DBLLMConfig())
    with pytest.raises(ConfigError, match="activation group size 48"):
        distill_w2a4(q, tiny_llama, _ids(4, 8), act_group_size=48, progress=False, plots=False)
    with pytest.raises(ConfigError, match="activation group size 48"):
        distill_w2a4(_llama(tiny_llama, DBLLMConfig(activation_group_size=48)), tiny_llama, _ids(4, 8),
                     progress=False, plots=False)


def test_old_config_dict_without_group_size_loads_as_per_token():
    old = A4.to_dict()
    del old["activation_group_size"]
    loaded = DBLLMConfig.from_dict(old)
    assert loaded.activation_group_size == 0 and loaded == A4
    assert DBLLMConfig.from_dict(A4G.to_dict()) == A4G
    assert DBLLMConfig().activation_group_size == 0


def test_saved_artifact_with_group_size_round_trips(tiny_llama, tmp_path):
    from dbllm_compile.artifact import load_deployed, save_deployed

    q = _llama(tiny_llama, A4G)
    for p in q.activation_parameters():
        p.data.fill_(0.3)
    d = dc.convert(q, progress=False)
    loaded = load_deployed(save_deployed(d, tmp_path / "art"))
    assert loaded.config.activation_group_size == 32
    assert _group_sizes(loaded, ACT_QUANT_OP) == [32] * 8
    ids = _ids(3, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(d(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)
