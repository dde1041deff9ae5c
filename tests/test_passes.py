"""The graph pass on several architectures: what it rewrites, skips, finds; numerics after."""

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.errors import QuantizationError
from dbllm_compile.ops import DEPLOY_OP, TRAIN_OP
from dbllm_compile.passes.graph_analysis import block_name


def _count(model, op):
    return sum(1 for n in model.graph_module.graph.nodes if n.op == "call_function" and n.target == op)


def _ids(vocab, b, t, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_llama_rewrites_every_decoder_linear_and_keeps_the_head(tiny_llama):
    q = dc.quantize(tiny_llama, (_ids(128, 2, 16),), example_kwargs={"use_cache": False}, progress=False)
    names = [r.name for r in q.report.rewritten]
    assert len(names) == 14 and _count(q, TRAIN_OP) == 14  # 7 per layer
    assert [(s.name, "head" in s.reason) for s in q.report.skipped] == [("lm_head", True)]
    assert "model.layers.1.mlp.down_proj" in names
    # networkx analyses: blocks and linears sharing an input
    assert [b.name for b in q.report.blocks] == ["model.layers.0", "model.layers.1"]
    assert len(q.report.blocks[0].linears) == 7 and q.report.blocks[0].inputs and q.report.blocks[0].outputs
    groups = [sorted(n.rsplit(".", 1)[1] for n in g) for g in q.report.sibling_groups]
    assert groups == [["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2


def test_llama_dynamic_shapes_and_close_to_fp(tiny_llama):
    q = dc.quantize(tiny_llama, (_ids(128, 2, 16),), example_kwargs={"use_cache": False}, progress=False)
    for b, t in [(1, 5), (3, 33)]:
        ids = _ids(128, b, t, seed=b)
        out = q(ids, use_cache=False).logits
        ref = tiny_llama(ids, use_cache=False).logits
        assert out.shape == ref.shape
        # 2-bit init of random weights is coarse but must stay correlated with the FP model
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
        assert cos > 0.5


def test_caller_model_is_not_modified(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    q = dc.quantize(tiny_llama, (_ids(128, 2, 8),), example_kwargs={"use_cache": False}, progress=False)
    for p in q.latent_parameters():
        p.data.add_(1.0)
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gpt2_conv1d_transposed_layout(tiny_gpt2):
    q = dc.quantize(tiny_gpt2, (_ids(100, 2, 8),), example_kwargs={"use_cache": False}, progress=False)
    assert len(q.report.rewritten) == 8
    assert {r.layout for r in q.report.rewritten} == {"kn"}
    assert {r.kind for r in q.report.rewritten} == {"addmm"}
    c_fc = next(r for r in q.report.rewritten if r.name == "transformer.h.0.mlp.c_fc")
    assert (c_fc.in_features, c_fc.out_features) == (64, 256)
    assert q.report.sibling_groups == []
    ids = _ids(100, 3, 11, seed=3)
    d = dc.convert(q, progress=False)
    assert torch.equal(q(ids, use_cache=False).logits, d(ids, use_cache=False).logits)


def test_gpt2_tied_head_is_skipped_with_reason(tiny_gpt2):
    cfg = dc.DBLLMConfig(keep_head=False)
    q = dc.quantize(tiny_gpt2, (_ids(100, 2, 8),), cfg, example_kwargs={"use_cache": False}, progress=False)
    (skip,) = q.report.skipped
    assert skip.name == "lm_head" and "tied" in skip.reason and "embedding" in skip.reason


def test_sequential_mlp_counts(mlp):
    x = torch.randn(4, 64)
    q = dc.quantize(mlp, (x,), progress=False)
    assert [r.name for r in q.report.rewritten] == ["0", "2"]
    assert [s.name for s in q.report.skipped] == ["4"]
    q_all = dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False), progress=False)
    assert len(q_all.report.rewritten) == 3 and not q_all.report.skipped
    assert [b.name for b in q_all.report.blocks] == ["0", "2", "4"]
    assert q_all(torch.randn(7, 64)).shape == (7, 10)  # dynamic batch


def test_include_exclude_patterns(tiny_llama):
    ex = (_ids(128, 2, 8),)
    kw = {"use_cache": False}
    q = dc.quantize(tiny_llama, ex, dc.DBLLMConfig(exclude=("*.mlp.*",)), example_kwargs=kw, progress=False)
    assert len(q.report.rewritten) == 8
    assert sum("exclude" in s.reason for s in q.report.skipped) == 6
    q = dc.quantize(tiny_llama, ex, dc.DBLLMConfig(include=(r"re:model\.layers\.1\..*_proj",)), example_kwargs=kw, progress=False)
    assert len(q.report.rewritten) == 7 and all(".layers.1." in r.name for r in q.report.rewritten)
    assert sum("include" in s.reason for s in q.report.skipped) == 7


class _Functional(torch.nn.Module):
    """Linears written by hand: x @ W.T, matmul(x, V) with V [in, out], addmm, W @ x, a computed weight."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.V = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.U = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.c = torch.nn.Parameter(torch.randn(64) * 0.1)
        self.L = torch.nn.Parameter(torch.randn(5, 5))
        self.out = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = torch.matmul(x, self.W.t())  # nk via transpose
        h = torch.relu(h) @ self.V  # kn
        h = torch.addmm(self.c, h.reshape(-1, 64), self.U.t()).reshape(x.shape)  # nk, with bias
        h = h @ (self.W * 2).t()  # weight computed: skipped
        s = self.L @ torch.ones(5, 64)  # parameter on the left: skipped
        scores = h @ h.transpose(-1, -2)  # activation product: counted
        return self.out(h + scores.sum(-1, keepdim=True) + s.sum())


def test_functional_linears_and_skip_reasons():
    torch.manual_seed(0)
    m = _Functional().eval()
    x = torch.randn(2, 5, 64)
    q = dc.quantize(m, (x,), dc.DBLLMConfig(keep_head=False), progress=False)
    got = {(r.name, r.layout) for r in q.report.rewritten}
    assert got == {("V", "kn"), ("U", "nk"), ("out", "nk")}
    reasons = {s.name: s.reason for s in q.report.skipped}
    # W is read by a rewritable site and by the computed-weight branch: it stays full precision.
    assert "also read by" in reasons["W"]
    assert any("computed by node" in r for r in reasons.values())
    assert any("left operand" in r for r in reasons.values())
    assert q.report.activation_products >= 1
    d = dc.convert(q, progress=False)
    assert torch.equal(q(x), d(x))
    assert _count(d, DEPLOY_OP) == 3 and _count(d, TRAIN_OP) == 0


def test_padding_is_reported():
    m = torch.nn.Sequential(torch.nn.Linear(100, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    q = dc.quantize(m, (torch.randn(2, 100),), progress=False)
    assert q.report.rewritten[0].padded_in_features == 128
    assert any("zero-padded to 128" in n for n in q.report.notes)


def test_nan_weight_error_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.o_proj.weight[3, 4] = float("nan")
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.self_attn\.o_proj.*NaN"):
        dc.quantize(tiny_llama, (_ids(128, 2, 8),), example_kwargs={"use_cache": False}, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models(dtype, mlp):
    m = mlp.to(dtype)
    x = torch.randn(3, 64).to(dtype)
    q = dc.quantize(m, (x,), progress=False)
    d = dc.convert(q, progress=False)
    y = d(x)
    assert y.dtype == dtype and torch.equal(q(x), y)


def test_block_name():
    assert block_name("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert block_name("encoder.0.blocks.3.fc") == "encoder.0.blocks.3"
    assert block_name("head") == "head"


def test_convert_drops_latent_weights_and_counts_bits(tiny_llama):
    q = dc.quantize(tiny_llama, (_ids(128, 2, 8),), example_kwargs={"use_cache": False}, progress=False)
    d = dc.convert(q, progress=False)
    names = dict(d.graph_module.named_buffers())
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert not any(n.endswith("q_proj.weight") for n, _ in d.graph_module.named_parameters())
    size = d.size_report()
    assert size.bits_per_weight == pytest.approx(2.5)  # 2 bits + two fp16 scales per 64
    with pytest.raises(dc.DBLLMError, match="train"):
        dc.convert(d)


def test_training_updates_scales_and_latents(tiny_llama):
    q = dc.quantize(tiny_llama, (_ids(128, 2, 8),), example_kwargs={"use_cache": False}, progress=False)
    params = list(q.scale_parameters()) + list(q.latent_parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-2)
    ids = _ids(128, 2, 8, seed=5)
    loss = torch.nn.functional.cross_entropy(q(ids, use_cache=False).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
