"""Integer-activation deploy ops (dbllm_compile/ops_int.py) and the rewrite pass (passes/int_activations.py)."""

import pytest
import torch
from torch.library import opcheck

import dbllm_compile as dc
from dbllm_compile.config import DBLLMConfig
from dbllm_compile.ops import ACT_QUANT_OP, DEPLOY_OP
from dbllm_compile.ops_int import ACT_QUANT_INT_OP, DB_LINEAR_A4_OP
from dbllm_compile.passes.int_activations import use_int_activations
from dbllm_compile.reference import pack_planes


def _nodes(model, op):
    return [n for n in model.graph_module.graph.nodes if n.op == "call_function" and n.target == op]


def _ids(b, t, seed=0, vocab=128):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _deployed_a4(model, ids, **cfg):
    q = dc.quantize(model, (ids,), example_kwargs={"use_cache": False},
                    config=DBLLMConfig(activation_bits=4, **cfg), progress=False)
    for p in q.activation_parameters():
        p.data.fill_(1.5)
    return dc.convert(q, progress=False)


def test_llama_rewrite_shares_codes_and_is_bit_identical(tiny_llama):
    d = _deployed_a4(tiny_llama, _ids(2, 16))
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        before = d(ids, use_cache=False).logits
    report = use_int_activations(d.graph_module)
    assert (report.quantizers, report.linears, report.skipped) == (8, 14, [])
    assert len(_nodes(d, ACT_QUANT_INT_OP)) == 8 and not _nodes(d, ACT_QUANT_OP) and not _nodes(d, DEPLOY_OP)
    linears = _nodes(d, DB_LINEAR_A4_OP)
    readers = sorted(sum(n.args[0].args[0] is q for n in linears) for q in _nodes(d, ACT_QUANT_INT_OP))
    assert readers == [1, 1, 1, 1, 2, 2, 3, 3]            # q/k/v and gate/up read one set of codes
    assert all(n.args[8] == torch.float32 for n in linears)
    with torch.no_grad():
        after = d(ids, use_cache=False).logits
    assert torch.equal(before, after)


def test_sign_codebook_offset_survives_the_rewrite(tiny_llama):
    d = _deployed_a4(tiny_llama, _ids(2, 16), codebook="sign", init="maxabs")
    ids = _ids(1, 7, seed=4)
    with torch.no_grad():
        before = d(ids, use_cache=False).logits
    assert use_int_activations(d.graph_module).linears == 14
    assert all(n.args[9] is not None for n in _nodes(d, DB_LINEAR_A4_OP))
    with torch.no_grad():
        assert torch.equal(before, d(ids, use_cache=False).logits)


def test_linears_reading_through_views_keep_the_fake_quant_path(tiny_gpt2):
    ids = _ids(2, 8, vocab=100)
    d = _deployed_a4(tiny_gpt2, ids)
    with torch.no_grad():
        before = d(ids, use_cache=False).logits
    report = use_int_activations(d.graph_module)
    assert report.linears + len(_nodes(d, DEPLOY_OP)) == 8 and report.skipped
    assert all("not directly" in why for _, why in report.skipped)
    with torch.no_grad():
        assert torch.equal(before, d(ids, use_cache=False).logits)


def test_per_group_quantizers_stay_on_the_fake_quant_path(tiny_llama):
    """act_quant with group_size > 0 has no int8 kernel: left alone, reported; G = 0 ones still fuse."""
    from dbllm_compile.ops import op_arguments

    d = _deployed_a4(tiny_llama, _ids(2, 16), activation_group_size=32)
    act = _nodes(d, ACT_QUANT_OP)
    assert [op_arguments(n)["group_size"] for n in act] == [32] * 8
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        before = d(ids, use_cache=False).logits
    report = use_int_activations(d.graph_module)
    assert (report.quantizers, report.linears, report.grouped) == (0, 0, 8) and len(report.skipped) == 14
    assert all("per-group activation scales (group_size=32)" in why and "per-token" in why for _, why in report.skipped)
    assert len(_nodes(d, ACT_QUANT_OP)) == 8 and len(_nodes(d, DEPLOY_OP)) == 14 and not _nodes(d, ACT_QUANT_INT_OP)
    with torch.no_grad():
        assert torch.equal(before, d(ids, use_cache=False).logits)

    # mixed graph: the first quantizer (q/k/v of layer 0) made per token again; only it is fused
    d = _deployed_a4(tiny_llama, _ids(2, 16), activation_group_size=32)
    first = _nodes(d, ACT_QUANT_OP)[0]
    first.args = first.args[:2]
    d.graph_module.recompile()
    with torch.no_grad():
        before = d(ids, use_cache=False).logits
    report = use_int_activations(d.graph_module)
    assert (report.quantizers, report.linears, report.grouped, len(report.skipped)) == (1, 3, 7, 11)
    assert len(_nodes(d, ACT_QUANT_INT_OP)) == 1 and len(_nodes(d, DB_LINEAR_A4_OP)) == 3
    assert len(_nodes(d, ACT_QUANT_OP)) == 7 and len(_nodes(d, DEPLOY_OP)) == 11
    with torch.no_grad():
        assert torch.equal(before, d(ids, use_cache=False).logits)


def test_ops_pass_opcheck_and_match_the_fake_quant_pair():
    gen = torch.Generator().manual_seed(0)
    n, k, g = 12, 100, 32
    k_pad = 128
    bits = torch.randint(0, 2, (2, n, k_pad), generator=gen, dtype=torch.uint8)
    bits[:, :, k:] = 0
    packed = pack_planes(bits[0], bits[1])
    a1, a2 = torch.rand(n, 4, generator=gen).half(), -torch.rand(n, 4, generator=gen).half()
    c = torch.randn(n, 4, generator=gen).half() * 0.1
    x = torch.randn(3, 5, k, generator=gen)
    r = torch.tensor(0.8)
    codes, scale = torch.ops.dbllm.act_quant_int(x, r)
    assert codes.dtype == torch.int8 and scale.shape == (3, 5, 1)
    for cc in (None, c):
        y = torch.ops.dbllm.db_linear_a4(codes, scale, packed, a1, a2, None, k, g, torch.float32, cc)
        ref = torch.ops.dbllm.db_linear(torch.ops.dbllm.act_quant(x, r), packed, a1, a2, None, k, g, cc)
        assert torch.equal(y, ref)
    opcheck(torch.ops.dbllm.act_quant_int.default, (x, r))
    opcheck(torch.ops.dbllm.db_linear_a4.default, (codes, scale, packed, a1, a2, None, k, g, torch.float32, c),
            test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the int8 kernels)")
def test_cuda_int8_path_matches_the_reference_call_by_call():
    """Every ``act_quant_int`` / ``db_linear_a4`` call of the rewritten model on CUDA against the
    same op on CPU with the same inputs: codes and scales bit-exact, outputs within fp16 rounding.

    Call by call, not logits against logits: the CUDA int8 GEMM uses the exact codes times the
    float32 token scale, the reference rounds ``codes * scale`` to fp16 first (it mirrors the
    fake-quant pair bit for bit), so outputs differ by about one fp16 ulp (relative 3e-4,
    measured on an H100, 2026-11-24, ``benchmarks/a4_gpu_diagnose.py``); each later 4-bit
    quantizer turns such differences into flipped codes, and in a random 2-layer model the logits
    then differ by ~10% (the same script), which says nothing about the kernels.
    """
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    d = _deployed_a4(model, _ids(2, 16, vocab=512).cuda())
    assert use_int_activations(d.graph_module).linears == 14
    checked = {"act_quant_int": 0, "db_linear_a4": 0}

    class Compare(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name in checked:
                assert all(a.is_cuda for a in args if isinstance(a, torch.Tensor))
                with _disable_current_modes():
                    ref = func(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **(kwargs or {}))
                if name == "act_quant_int":
                    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
                else:
                    assert out.dtype == ref.dtype == torch.float16
                    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-3,
                                               atol=2e-3 * ref.abs().max().item())
                checked[name] += 1
            return out

    with torch.no_grad(), Compare():
        logits = d(_ids(3, 11, seed=5, vocab=512).cuda(), use_cache=False).logits
    assert checked == {"act_quant_int": 8, "db_linear_a4": 14}
    assert torch.isfinite(logits).all()
