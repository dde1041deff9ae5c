"""Horizontal fusion of sibling ``db_linear_gpu`` calls (backends/dynamo/fusion.py), on CPU:
``db_linear_gpu`` computes its torch reference there (dequantize the GPU layout, ``F.linear``)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import fx

import dbllm_compile.backends  # noqa: F401  (defines dbllm::db_linear_gpu when Triton is importable)
from dbllm_compile.backends.dynamo import CompileOptions, reset_stats, stats
from dbllm_compile.backends.dynamo.diagnostics import GraphRecord
from dbllm_compile.backends.dynamo.fusion import fuse_sibling_linears
from dbllm_compile.reference import pack_planes

if not hasattr(torch.ops.dbllm, "db_linear_gpu"):
    pytest.skip("dbllm::db_linear_gpu needs Triton (pip install 'dbllm-compile[triton]')", allow_module_level=True)

from dbllm_compile.backends.triton import to_gpu_layout  # noqa: E402

GPU_OP = torch.ops.dbllm.db_linear_gpu.default
B, T, HEADS, HD = 2, 3, 4, 16
K = HEADS * HD


def _gpu_weights(n: int, k: int, g: int, seed: int, dtype: torch.dtype = torch.float16):
    gen = torch.Generator().manual_seed(seed)
    k_pad = -(-k // g) * g
    bits = torch.randint(0, 2, (2, n, k_pad), generator=gen, dtype=torch.uint8)
    bits[:, :, k:] = 0
    a1 = torch.rand(n, k_pad // g, generator=gen) * 0.04 + 0.01
    a2 = -torch.rand(n, k_pad // g, generator=gen) * 0.02
    return to_gpu_layout(pack_planes(bits[0], bits[1]), a1, a2, k, g, dtype)


def _build(bias_meta: bool = True) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """x -> q (bias), k (no bias), v (bias), [v_g32: group size 32], [shared: buffer read twice];
    h = x * 2 -> gate (bias placeholder), up (no bias), h3 (bias buffer); z -> lone, [bf16 scales]. Every output
    viewed per head. ``bias_meta``: give the bias placeholder the example value Dynamo records."""
    root = torch.nn.Module()
    g = fx.Graph()
    x, z, gate_bias = g.placeholder("x"), g.placeholder("z"), g.placeholder("gate_bias")
    if bias_meta:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            gate_bias.meta["example_value"] = torch.empty(128)
    h = g.call_function(operator.mul, (x, 2.0))
    outs: list[fx.Node] = []

    def linear(name: str, inp: fx.Node, n: int, seed: int, bias, group_size: int = 64,
               dtype: torch.dtype = torch.float16, reuse: str | None = None) -> fx.Node:
        src = reuse or name
        if reuse is None:
            gw = _gpu_weights(n, K, group_size, seed, dtype)
            root.register_buffer(f"{name}_qweight", gw.qweight)
            root.register_buffer(f"{name}_scales", gw.scales)
        if isinstance(bias, torch.Tensor):
            root.register_buffer(f"{name}_bias", bias)
            bias = g.get_attr(f"{name}_bias")
        y = g.call_function(GPU_OP, (inp, g.get_attr(f"{src}_qweight"), g.get_attr(f"{src}_scales"), bias,
                                     K, group_size))
        outs.append(g.call_method("view", (y, B, T, -1, HD)))
        return y

    gen = torch.Generator().manual_seed(1)
    linear("q", x, 64, 10, torch.randn(64, generator=gen))
    linear("k", x, 32, 11, None)
    linear("v", x, 32, 12, torch.randn(32, generator=gen))
    linear("v_g32", x, 32, 13, None, group_size=32)
    linear("gate", h, 128, 14, gate_bias)
    linear("up", h, 128, 15, None)
    linear("h3", h, 64, 19, torch.randn(64, generator=gen))  # a bias buffer read after gate
    linear("lone", z, 48, 16, None)
    linear("bf16", z, 32, 17, None, dtype=torch.bfloat16)
    linear("shared_a", x, 16, 18, None, group_size=128)
    linear("shared_b", x, 16, 18, None, group_size=128, reuse="shared_a")
    g.output(tuple(outs))
    gm = fx.GraphModule(root, g)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(B, T, K, generator=gen), torch.randn(B, T, K, generator=gen), torch.randn(128, generator=gen)]
    return gm, inputs


def _gpu_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == GPU_OP]


def _record() -> GraphRecord:
    return GraphRecord(compile_id="0/0", recompile=False, mode="lower", training=False)


@pytest.mark.parametrize("bias_meta", [True, False])
def test_fuses_siblings_and_keeps_outputs(bias_meta):
    gm, inputs = _build(bias_meta)
    with torch.no_grad():
        before = gm(*inputs)
    assert len(_gpu_nodes(gm)) == 11
    record = _record()
    fuse_sibling_linears(gm, record)
    gm.recompile()
    # q/k/v -> 1 (not v_g32: other group size; not shared_a/b: one buffer read twice); gate/up/h3
    # -> 1, unless the dtype of gate's bias (a graph input) is unknown: then they stay apart
    fused = 2 if bias_meta else 1
    assert len(_gpu_nodes(gm)) == 11 - 2 - 2 * (fused - 1)
    assert record.lowered == {"db_linear_gpu:fused_groups": fused, "db_linear_gpu:fused_linears": 3 + 3 * (fused - 1)}
    with torch.no_grad():
        after = gm(*inputs)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.shape == b.shape and a.shape[:2] == (B, T) and a.shape[-1] == HD
        assert torch.equal(a, b)


def test_gradients_match_after_fusion():
    """Training graphs: dL/dx sums over the siblings (one product on the fused weight) and
    dL/dbias flows through the in-graph concatenation of a bias input."""
    grads = []
    for fuse in (False, True):
        gm, (x, z, bias) = _build()
        if fuse:
            fuse_sibling_linears(gm, _record())
            gm.recompile()
        x, bias = x.requires_grad_(), bias.requires_grad_()
        sum(o.square().sum() for o in gm(x, z, bias)).backward()
        grads.append((x.grad, bias.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[1][1], grads[0][1])


def test_second_run_does_not_clobber_fused_buffers():
    gm, inputs = _build()
    with torch.no_grad():
        before = gm(*inputs)
    fuse_sibling_linears(gm, _record())
    record = _record()
    fuse_sibling_linears(gm, record)  # nothing left to fuse
    gm.recompile()
    assert not record.lowered
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(*inputs), before))


def test_fused_call_layout_and_old_buffers_removed():
    gm, _ = _build()
    fuse_sibling_linears(gm, _record())
    buffers = dict(gm.named_buffers())
    for name in ("q", "k", "v", "gate", "up", "h3"):
        assert f"{name}_qweight" not in buffers and f"{name}_scales" not in buffers
    assert "q_bias" not in buffers and "v_bias" not in buffers
    for name in ("v_g32", "lone", "bf16", "shared_a"):
        assert f"{name}_qweight" in buffers and f"{name}_scales" in buffers
    fused = [n for n in _gpu_nodes(gm) if n.args[1].target.startswith("_dbllm_fused_")]
    assert len(fused) == 2
    qkv, mlp = sorted(fused, key=lambda n: n.args[0].name != "x")
    assert tuple(getattr(gm, qkv.args[1].target).shape)[0] == 64 + 32 + 32
    assert tuple(getattr(gm, mlp.args[1].target).shape)[0] == 128 + 128 + 64
    # q/k/v biases were buffers: one concatenated buffer, zeros for k
    qkv_bias = getattr(gm, qkv.args[3].target)
    assert qkv_bias.shape == (128,) and torch.equal(qkv_bias[64:96], torch.zeros(32))
    # gate's bias is a graph input: concatenated in the graph (a zero block for up, h3's buffer)
    cat = mlp.args[3]
    assert cat.target is torch.cat and [b.op for b in cat.args[0]] == ["placeholder", "get_attr", "get_attr"]
    assert torch.equal(getattr(gm, cat.args[0][1].target), torch.zeros(128))
    assert cat.args[0][2].target == "h3_bias"
    # every fused output is read through slices, made contiguous for the views downstream
    slices = list(qkv.users)
    assert [u.target for u in slices] == [torch.ops.aten.slice.Tensor] * 3
    assert [s.args[2:] for s in slices] == [(0, 64), (64, 96), (96, 128)]
    assert all(list(s.users)[0].target == "contiguous" for s in slices)


def test_fusion_is_shared_between_graphs():
    """Two graphs on the same per-layer buffers share one concatenated copy (prefill / decode)."""
    gm1, _ = _build()
    gm2 = fx.GraphModule(gm1, copy.deepcopy(gm1.graph))  # a second graph over the same tensors
    fuse_sibling_linears(gm1, _record())
    fuse_sibling_linears(gm2, _record())
    fused1 = {n.args[0].name: getattr(gm1, n.args[1].target) for n in _gpu_nodes(gm1) if "fused" in n.args[1].target}
    fused2 = {n.args[0].name: getattr(gm2, n.args[1].target) for n in _gpu_nodes(gm2) if "fused" in n.args[1].target}
    assert fused1.keys() == fused2.keys() == {"x", "mul"}
    assert all(fused1[k] is fused2[k] for k in fused1)


def test_option_is_validated():
    from dbllm_compile.errors import ConfigError

    assert CompileOptions().fuse_siblings is True
    with pytest.raises(ConfigError, match="fuse_siblings"):
        CompileOptions.from_options({"fuse_siblings": "yes"})


@pytest.mark.parametrize("attention_bias, inductor", [(False, False), (True, False), (True, True)])
def test_backend_fuses_tiny_llama(attention_bias, inductor, monkeypatch):
    """Through ``torch.compile(backend="dbllm")`` with the GPU form forced on CPU: 2 layers x
    (q/k/v + gate/up) fuse into 4 sibling calls, or with the GLU rewrite (the default) into 2
    sibling calls (q/k/v) and 2 ``db_glu_gpu`` calls, with the same logits as without fusion.
    With ``attention_bias`` the q/k/v biases are graph inputs (concatenated in the graph)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dbllm_compile.backends.dynamo import lowering

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, attention_bias=attention_bias)).eval()
    monkeypatch.setattr(lowering, "_gpu_form", lambda x_val, device, opts: torch.float16)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    expected = {"none": (0, 0, 0), "siblings": (4, 10, 0), "both": (2, 6, 2)}
    try:
        for variant, (fuse, glu) in {"none": (False, False), "siblings": (True, False), "both": (True, True)}.items():
            torch._dynamo.reset()
            reset_stats()
            compiled = torch.compile(model, backend="dbllm", fullgraph=True,
                                     options={"init": "maxabs", "inductor": inductor, "fuse_siblings": fuse,
                                              "fuse_glu": glu})
            with torch.no_grad():
                logits[variant] = compiled(ids, use_cache=False).logits
            s = stats()
            assert s.ops_lowered["db_linear_gpu"] == 14
            assert (s.fused_groups, s.linears_fused, s.glu_fused) == expected[variant]
            if variant == "siblings":
                assert "fused 10 sibling db_linear_gpu call(s) into 4 call(s)" in s.summary()
                assert s.to_dict()["linears_fused"] == 10
    finally:
        torch._dynamo.reset()
    assert "fused 2 gated MLP(s)" in s.summary() and s.to_dict()["glu_fused"] == 2
    if inductor:  # Inductor may schedule the fused and unfused graphs' reductions differently
        torch.testing.assert_close(logits["siblings"], logits["none"], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(logits["siblings"], logits["none"])
    # the GLU call computes gate and up as one product on the concatenated weights
    torch.testing.assert_close(logits["both"], logits["none"], rtol=1e-5, atol=1e-5)


def test_rotated_tiny_llama_keeps_the_fusions_and_the_logits(monkeypatch):
    """``rotation_block``: the inserted rotation is one node per shared input, so q/k/v and gate/up
    still fuse, and the logits are those of the eagerly deployed rotated model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dbllm_compile as dc
    from dbllm_compile.backends.dynamo import lowering

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    deployed = dc.convert(dc.quantize(model, (ids,), dc.DBLLMConfig(rotation_block=64, init="maxabs"),
                                      example_kwargs={"use_cache": False}, progress=False), progress=False)
    seen = []

    def gpu_form(x_val, device, opts):  # the rotated input must keep the value the form is chosen by
        seen.append(isinstance(x_val, torch.Tensor) and x_val.dtype == torch.float32)
        return torch.float16

    monkeypatch.setattr(lowering, "_gpu_form", gpu_form)
    torch._dynamo.reset()
    reset_stats()
    try:
        compiled = torch.compile(model, backend="dbllm", fullgraph=True,
                                 options={"init": "maxabs", "inductor": False, "rotation_block": 64})
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
            ref = deployed(ids).logits
    finally:
        torch._dynamo.reset()
    s = stats()
    assert (s.fused_groups, s.linears_fused, s.glu_fused) == (2, 6, 2)
    assert s.ops_lowered["hadamard:decomposed"] == 8
    assert seen and all(seen), seen
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
