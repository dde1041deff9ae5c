"""The end-to-end distillation step (``distill/step.py``), on CPU: compiled against eager.

Compiled, ``student_loss`` is ``torch.compile(backend="dbllm", fullgraph=True)`` of the student's
forward and the loss in one graph, and the teacher goes through plain ``torch.compile``. Here
``torch.compile`` is wrapped so that the dbllm backend runs with ``options={"inductor": False}``
(Dynamo, the backend's passes and AOTAutograd's forward/backward trace, no Inductor code
generation) and the teacher with ``backend="aot_eager"``: seconds on a cold cache, and the same
graphs the stage compiles up to Inductor's lowering.
"""

from __future__ import annotations

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.backends.dynamo import stats
from dbllm_compile.distill.losses import LossSpec, dad_weights, distill_loss
from dbllm_compile.distill.step import build_step, logits_of, uses_cuda_graphs

CPU = torch.device("cpu")


class _UpcastLogits(torch.nn.Module):
    """A tiny random Llama returning float32 logits (no KV cache). Its weights are initialised
    wide (``initializer_range=0.5``, not 0.02): the default gives near-uniform logits, whose DAD
    weights are all 1 to 1e-3, so that DAD and plain KL agree to 1e-5 and a step computing the one
    for the other would pass."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                          initializer_range=0.5)
        self.llm = LlamaForCausalLM(cfg).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(ids, use_cache=False).logits.float()


def _data(n=4, t=16, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _models():
    """``(teacher, student, ids)``: only the student's scales and latent weights trainable, as in training."""
    data = _data()
    teacher = _UpcastLogits()
    student = dc.quantize(teacher, (data[:2],), dc.DBLLMConfig(init="maxabs"), progress=False)
    trainable = {id(p) for p in (*student.scale_parameters(), *student.latent_parameters())}
    for p in student.graph_module.parameters():
        p.requires_grad_(id(p) in trainable)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student, data


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture
def compile_calls(monkeypatch):
    """Every ``torch.compile`` call's keyword arguments; the calls go through fast backends (see the module docstring)."""
    calls = []
    real_compile = torch.compile

    def spy_compile(fn, **kwargs):
        calls.append(kwargs)
        if kwargs.get("backend") == "dbllm":
            return real_compile(fn, **{**kwargs, "options": {"inductor": False}})
        return real_compile(fn, backend="aot_eager")  # the teacher

    monkeypatch.setattr(torch, "compile", spy_compile)
    return calls


def _params(student):
    return [*student.scale_parameters(), *student.latent_parameters()]


def _run(student, teacher, ids, spec, *, compile):
    """One step of ``build_step``: ``(loss, student logits, teacher logits, gradients of scales and latents)``."""
    teacher_logits, student_loss = build_step(student, teacher, spec, bf16=False, device=CPU, compile=compile)
    params = _params(student)
    for p in params:
        p.grad = None
    t_logits = teacher_logits(ids)
    loss, s_logits = student_loss(ids, t_logits)
    loss.backward()
    assert all(p.grad is not None for p in params)
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), s_logits, t_logits, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- uses_cuda_graphs


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_uses_cuda_graphs_only_compiled_with_cuda_graphs_on_cuda(compile, cuda_graphs):
    assert uses_cuda_graphs(compile, cuda_graphs, torch.device("cpu")) is False
    assert uses_cuda_graphs(compile, cuda_graphs, torch.device("cuda")) is (compile and cuda_graphs)
    assert uses_cuda_graphs(compile, cuda_graphs, torch.device("cuda", 0)) is (compile and cuda_graphs)


# ----------------------------------------------------------------------------- compiled = eager


@pytest.mark.parametrize("spec", [LossSpec(), LossSpec("kl")], ids=["dad", "kl"])
def test_compiled_step_matches_the_eager_step(compile_calls, spec):
    teacher, student, ids = _models()
    loss_e, s_e, t_e, grads_e = _run(student, teacher, ids, spec, compile=False)
    loss_c, s_c, t_c, grads_c = _run(student, teacher, ids, spec, compile=True)

    # the eager step is the loss of the student's and the teacher's logits, computed directly
    with torch.no_grad():
        s_ref, t_ref = logits_of(student(ids)), teacher(ids)
        ref = distill_loss(s_ref, t_ref, spec)
    assert torch.equal(s_e, s_ref) and torch.equal(t_e, t_ref) and torch.equal(loss_e, ref)
    assert float(loss_e) > 1e-3  # a random student is far from its teacher: a loss, and gradients, to compare
    # the tolerances below tell the losses apart: DAD's weights vary, DAD and KL differ by far more than 1e-5
    other = distill_loss(s_ref, t_ref, LossSpec("kl") if spec.kind == "dad" else LossSpec())
    assert abs(float(other) / float(ref) - 1) > 1e-3
    assert dad_weights(t_ref, s_ref).std() > 0.1
    assert all(g.norm() > 0 and torch.isfinite(g).all() for g in grads_e)

    # the compiled step went through the dbllm backend as one training graph (forward + loss)
    assert len(compile_calls) == 2
    st = stats()
    assert st.graphs_compiled == 1 and st.graphs[0].training and st.num_graph_breaks == 0

    # same logits, loss and gradients on every scale and latent weight
    torch.testing.assert_close(t_c, t_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_c, s_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0.0)
    assert len(grads_c) == len(grads_e) == len(_params(student)) > 0
    for k, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        assert gc.shape == ge.shape and _rel(gc, ge) < 1e-5, k
    flat_c, flat_e = torch.cat([g.flatten() for g in grads_c]), torch.cat([g.flatten() for g in grads_e])
    assert _rel(flat_c, flat_e) < 1e-5


# ----------------------------------------------------------------------------- torch.compile calls


def test_compiled_step_compiles_student_with_dbllm_and_the_teacher(compile_calls):
    teacher, student, ids = _models()
    build_step(student, teacher, LossSpec(), bf16=False, device=CPU, compile=True)
    # the student's forward and the loss: one dbllm graph, no CUDA graphs on CPU; then the teacher
    assert compile_calls == [{"backend": "dbllm", "fullgraph": True, "options": None}, {"mode": None}]
    compile_calls.clear()
    build_step(student, teacher, LossSpec(), bf16=False, device=CPU, compile=True, cuda_graphs=True)
    assert compile_calls == [{"backend": "dbllm", "fullgraph": True, "options": None}, {"mode": None}]
    compile_calls.clear()
    teacher_logits, _ = build_step(student, teacher, LossSpec(), bf16=False, device=CPU, compile=True,
                                   compile_teacher=False)
    assert compile_calls == [{"backend": "dbllm", "fullgraph": True, "options": None}]  # the teacher stays eager
    with torch.no_grad():
        assert torch.equal(teacher_logits(ids), teacher(ids))
    compile_calls.clear()
    build_step(student, teacher, LossSpec(), bf16=False, device=CPU, compile=False)
    assert compile_calls == []


# ----------------------------------------------------------------------------- the teacher


@pytest.mark.parametrize("compile, compile_teacher", [(False, True), (True, True), (True, False)],
                         ids=["eager", "compiled", "compiled-eager-teacher"])
def test_teacher_logits_run_without_gradient(compile_calls, compile, compile_teacher):
    teacher, student, ids = _models()
    for p in teacher.parameters():
        p.requires_grad_(True)  # even a teacher with trainable parameters gives logits without gradient
    teacher_logits, _ = build_step(student, teacher, LossSpec(), bf16=False, device=CPU, compile=compile,
                                   compile_teacher=compile_teacher)
    out = teacher_logits(ids)
    assert out.requires_grad is False and out.grad_fn is None
    assert out.shape == (*ids.shape, 128) and out.dtype == torch.float32
    assert torch.is_grad_enabled()  # the no_grad is scoped to the call
    assert len(compile_calls) == (0 if not compile else 2 if compile_teacher else 1)
