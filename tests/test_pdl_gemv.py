"""Batch-1 gemvs launched with PDL: ``dbllm::db_gemv_pdl`` (backends/triton/pdl_op.py) and the
backend's rewrite to it (backends/dynamo/pdl.py).

On CPU the op is the torch reference of ``db_linear_gpu`` / ``db_glu_gpu`` and the rewrite is
checked with the device test forced; on a Hopper GPU the op must give bit for bit the numbers of
the same gemv launched without PDL, eagerly and inside a CUDA graph.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends.dynamo import CompileOptions
from dbllm_compile.backends.dynamo import pdl as pdl_pass
from dbllm_compile.backends.dynamo.diagnostics import GraphRecord
from dbllm_compile.errors import ConfigError
from dbllm_compile.reference import pack_planes

if not hasattr(torch.ops.dbllm, "db_gemv_pdl"):
    pytest.skip("dbllm::db_gemv_pdl needs Triton (pip install 'dbllm-compile[triton]')", allow_module_level=True)

from dbllm_compile.backends.triton import to_gpu_layout  # noqa: E402

GPU_OP = torch.ops.dbllm.db_linear_gpu.default
GLU_OP = torch.ops.dbllm.db_glu_gpu.default
PDL_OP = torch.ops.dbllm.db_gemv_pdl.default
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _weights(n: int, k: int, seed: int, device="cpu", g: int = 64):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (2, n, k), generator=gen, dtype=torch.uint8)
    a1 = torch.rand(n, k // g, generator=gen) * 0.04 + 0.01
    a2 = -torch.rand(n, k // g, generator=gen) * 0.02
    gw = to_gpu_layout(pack_planes(bits[0], bits[1]), a1, a2, k, g, torch.float16)
    return gw.qweight.to(device), gw.scales.to(device)


@pytest.mark.parametrize("glu", [False, True])
def test_pdl_op_is_the_reference_on_cpu(glu):
    k, n = 128, 48
    qw, sc = _weights(n, k, 1)
    bias = torch.randn(n)
    x = torch.randn(1, 1, k)
    ref = (GLU_OP if glu else GPU_OP)(x, qw, sc, bias, k, 64)
    out = PDL_OP(x, qw, sc, bias, k, 64, glu)
    assert out.shape == (1, 1, n // 2 if glu else n)
    assert torch.equal(out, ref)


def _graph(k: int = 64, h: int = 64) -> fx.GraphModule:
    """``x -> qkv (db_linear_gpu) -> glu (db_glu_gpu) -> down``, the shapes of one decode layer."""
    root = torch.nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    for name, n, kk in (("qkv", k, k), ("glu", 2 * h, k), ("down", k, h)):
        qw, sc = _weights(n, kk, len(name))
        root.register_buffer(f"{name}_qweight", qw)
        root.register_buffer(f"{name}_scales", sc)
    y = g.call_function(GPU_OP, (x, g.get_attr("qkv_qweight"), g.get_attr("qkv_scales"), None, k, 64))
    y = g.call_function(operator.add, (y, x))
    z = g.call_function(GLU_OP, (y, g.get_attr("glu_qweight"), g.get_attr("glu_scales"), None, k, 64))
    g.output((g.call_function(GPU_OP, (z, g.get_attr("down_qweight"), g.get_attr("down_scales"), None, h, 64)),))
    gm = fx.GraphModule(root, g)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # example values as Dynamo records them: one row
        x.meta["example_value"] = torch.empty(1, 1, k, dtype=torch.float16)
        y.meta["example_value"] = torch.empty(1, 1, k, dtype=torch.float16)
        z.meta["example_value"] = torch.empty(1, 1, h, dtype=torch.float16)
    return gm


def _record() -> GraphRecord:
    return GraphRecord(compile_id="0/0", recompile=False, mode="lower", training=False)


def test_rewrite_needs_one_row_of_fp16_on_cuda():
    gm = _graph()
    record = _record()
    assert not pdl_pass.use_pdl_gemv(gm, record, "auto")  # CPU example values: nothing to do
    assert not pdl_pass.use_pdl_gemv(gm, record, True)  # (no batch-1 CUDA call: nothing to refuse)
    assert PDL_OP not in [n.target for n in gm.graph.nodes] and not record.lowered


def _force_cuda(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(pdl_pass, "_one_row_fp16_cuda",
                        lambda x: torch.device("cuda") if isinstance(x, fx.Node) else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_rewrite_targets_every_batch1_call_and_keeps_the_numbers(monkeypatch):
    gm = _graph()
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = gm(x)[0]
    _force_cuda(monkeypatch)
    record = _record()
    assert pdl_pass.use_pdl_gemv(gm, record, "auto") == pdl_pass.inductor_supports_pdl()
    if not pdl_pass.inductor_supports_pdl():
        pytest.skip(f"torch {torch.__version__} has no Inductor PDL code generation")
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == PDL_OP]
    assert [n.args[-1] for n in calls] == [False, True, False] and record.lowered == {"db_gemv_pdl": 3}
    with torch.no_grad():
        assert torch.equal(gm(x)[0], before)


def test_pdl_true_names_what_is_missing(monkeypatch):
    _force_cuda(monkeypatch, capability=(8, 0))
    assert not pdl_pass.use_pdl_gemv(_graph(), _record(), "auto")
    with pytest.raises(ConfigError, match="compute capability 9.0"):
        pdl_pass.use_pdl_gemv(_graph(), _record(), True)
    assert not pdl_pass.use_pdl_gemv(_graph(), _record(), False)


def test_pdl_option_is_validated():
    assert CompileOptions().pdl == "auto"
    assert CompileOptions.from_options({"pdl": False}).pdl is False
    with pytest.raises(ConfigError, match="pdl"):
        CompileOptions.from_options({"pdl": "on"})


@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper GPU")
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008), (1536, 576)])
def test_pdl_gemv_equals_the_plain_launch_on_gpu_and_in_a_cuda_graph(glu, n, k):
    qw, sc = _weights(n, k, 3, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = (GLU_OP if glu else GPU_OP)(x, qw, sc, bias, k, 64)
    assert torch.equal(PDL_OP(x, qw, sc, bias, k, 64, glu), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = x * 1.0  # a kernel before the PDL launch, writing its input
        out = PDL_OP(h, qw, sc, bias, k, 64, glu)
        after = out * 1.0  # and one after it, reading its output
    x.copy_(torch.randn(1, k, device="cuda", dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    ref = (GLU_OP if glu else GPU_OP)(x, qw, sc, bias, k, 64)
    assert torch.equal(after, ref)
