"""The gated-MLP rewrite of the backend (``fuse_glu_linears``, backends/dynamo/fusion.py), on CPU:
``db_glu_gpu`` and ``db_linear_gpu`` compute their torch references there."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

import dbllm_compile.backends  # noqa: F401  (defines the GPU ops when Triton is importable)
from dbllm_compile.backends.dynamo import CompileOptions
from dbllm_compile.backends.dynamo.diagnostics import GraphRecord
from dbllm_compile.backends.dynamo.fusion import fuse_glu_linears, fuse_sibling_linears
from dbllm_compile.reference import pack_planes

if not hasattr(torch.ops.dbllm, "db_glu_gpu"):
    pytest.skip("dbllm::db_glu_gpu needs Triton (pip install 'dbllm-compile[triton]')", allow_module_level=True)

from dbllm_compile.backends.triton import to_gpu_layout  # noqa: E402

GPU_OP = torch.ops.dbllm.db_linear_gpu.default
GLU_OP = torch.ops.dbllm.db_glu_gpu.default
K, H, G = 64, 96, 64


def _weights(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (2, n, K), generator=gen, dtype=torch.uint8)
    a1 = torch.rand(n, K // G, generator=gen) * 0.04 + 0.01
    a2 = -torch.rand(n, K // G, generator=gen) * 0.02
    return to_gpu_layout(pack_planes(bits[0], bits[1]), a1, a2, K, G, torch.float16)


def _build(variant: str = "llama") -> fx.GraphModule:
    """``x -> gate, up; down(silu(gate) * up)`` (the MLP of Llama-style models), with variants:
    ``"swapped"`` (``up * silu(gate)``, aten ops, a bias buffer on gate), ``"gate_reused"`` (the
    gate's output also returned), ``"rows"`` (up with fewer rows), ``"gelu"`` (a GELU gate)."""
    root = torch.nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")

    def linear(name: str, inp: fx.Node, n: int, seed: int, bias: bool = False) -> fx.Node:
        gw = _weights(n, seed)
        root.register_buffer(f"{name}_qweight", gw.qweight)
        root.register_buffer(f"{name}_scales", gw.scales)
        b = None
        if bias:
            root.register_buffer(f"{name}_bias", torch.randn(n, generator=torch.Generator().manual_seed(seed)))
            b = g.get_attr(f"{name}_bias")
        return g.call_function(GPU_OP, (inp, g.get_attr(f"{name}_qweight"), g.get_attr(f"{name}_scales"), b, K, G))

    gate = linear("gate", x, H, 1, bias=variant == "swapped")
    up = linear("up", x, H - 32 if variant == "rows" else H, 2)
    if variant == "gelu":
        act = g.call_function(F.gelu, (gate,))
    elif variant == "swapped":
        act = g.call_function(torch.ops.aten.silu.default, (gate,))
    else:
        act = g.call_function(F.silu, (gate,), {"inplace": False})
    if variant == "rows":
        up = g.call_function(F.pad, (up, (0, 32)))
    if variant == "swapped":
        h = g.call_function(torch.ops.aten.mul.Tensor, (up, act))
    else:
        h = g.call_function(operator.mul, (act, up))
    w_down = _weights(K, 3)
    root.register_buffer("down_qweight", w_down.qweight)
    root.register_buffer("down_scales", w_down.scales)
    down = g.call_function(GPU_OP, (h, g.get_attr("down_qweight"), g.get_attr("down_scales"), None, H, G))
    g.output((down, gate) if variant == "gate_reused" else (down,))
    return fx.GraphModule(root, g)


def _record() -> GraphRecord:
    return GraphRecord(compile_id="0/0", recompile=False, mode="lower", training=False)


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("variant", ["llama", "swapped"])
def test_gated_mlp_becomes_one_glu_call_with_the_same_output(variant):
    gm = _build(variant)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = gm(x)
    record = _record()
    fuse_glu_linears(gm, record)
    gm.recompile()
    assert record.lowered == {"db_glu_gpu:fused": 1}
    assert _targets(gm) == [GLU_OP, GPU_OP]  # silu, mul and the two linears are gone
    assert not hasattr(gm, "gate_qweight") and not hasattr(gm, "up_scales")  # old buffers dropped
    assert not hasattr(gm, "gate_bias")
    with torch.no_grad():
        after = gm(x)
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gate_reused", "rows", "gelu"])
def test_gated_mlp_that_cannot_be_fused_is_left_alone(variant):
    gm = _build(variant)
    targets = _targets(gm)
    record = _record()
    fuse_glu_linears(gm, record)
    assert _targets(gm) == targets and not record.lowered


def test_glu_fusion_runs_before_sibling_fusion_and_twice_is_harmless():
    gm = _build()
    x = torch.randn(1, 1, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = gm(x)
    fuse_glu_linears(gm, _record())
    record = _record()
    fuse_glu_linears(gm, record)
    fuse_sibling_linears(gm, record)  # gate and up are no longer siblings
    gm.recompile()
    assert not record.lowered and _targets(gm) == [GLU_OP, GPU_OP]
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], before[0], rtol=1e-5, atol=1e-5)


def test_fuse_glu_option_is_validated():
    assert CompileOptions().fuse_glu is True
    assert CompileOptions.from_options({"fuse_glu": False}).fuse_glu is False
    with pytest.raises(Exception, match="fuse_glu"):
        CompileOptions.from_options({"fuse_glu": "yes"})
