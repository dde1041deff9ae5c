"""The end-to-end distillation step's two calls, eager or compiled (with CUDA graphs on a GPU).

:func:`build_step` returns ``(teacher_logits, student_loss)``:

- ``teacher_logits(ids)``: the teacher's logits, without gradient;
- ``student_loss(ids, t_logits)``: ``(loss, student_logits)``, the loss with gradient to the
  student's trainable parameters, the logits detached.

Eager (``DistillConfig.compile=False``) they are plain calls. Compiled, ``student_loss`` is one
``torch.compile(..., backend="dbllm", fullgraph=True)`` graph holding the student's forward *and*
the loss (so Inductor fuses the log-softmaxes, the KL and the DAD-ED weights over the
``[tokens, vocab]`` logits instead of a dozen eager passes), and the teacher goes through plain
``torch.compile`` (``DistillConfig.compile_teacher``). On CUDA with
``DistillConfig.cuda_graphs`` both run in Inductor's ``"reduce-overhead"`` mode: cudagraph trees
record the teacher, the student's forward and its backward once and replay them, so the step's
~1,000-1,300 kernel launches cost a few graph launches. Measured on an H100 (8 SmolLM2 layers,
8 x 512 tokens, docs/results.md 3.0e): 58.7 ms per step for the compiled student with an eager
teacher (the form the recipe used until then), 36.6 ms with both graphed, against 34.7 ms of
kernels; the step was bound by the host's kernel launches.

CUDA graphs reuse their output buffers at the next replay: the teacher's logits are cloned out
of the graph's pool (one copy of ``[tokens, vocab]`` per step), the student's logits and loss are
read before the next step, and :func:`mark_step` starts each step (a new cudagraph-tree
generation). The optimizer and the gradient clipping stay outside the graphs; the trainable
parameters are updated in place, so the graphs see the new values.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dbllm_compile.distill.losses import LossSpec, distill_loss

__all__ = ["build_step", "logits_of", "mark_step", "uses_cuda_graphs"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output (``.logits``, the first element of a tuple, or the tensor)."""
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, (tuple, list)) else output


def uses_cuda_graphs(compile: bool, cuda_graphs: bool, device: torch.device) -> bool:
    """Whether the step runs under CUDA graphs: compiled, asked for, and on a CUDA device."""
    return bool(compile and cuda_graphs and device.type == "cuda")


def mark_step(graphed: bool) -> None:
    """Start a training step: a new cudagraph-tree generation (outputs of earlier replays may be overwritten)."""
    if graphed:
        torch.compiler.cudagraph_mark_step_begin()


def build_step(
    student: Callable[[torch.Tensor], Any],
    teacher: Callable[[torch.Tensor], Any],
    loss: LossSpec,
    *,
    bf16: bool,
    device: torch.device,
    compile: bool,
    compile_teacher: bool = True,
    cuda_graphs: bool = True,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """``(teacher_logits, student_loss)`` for one end-to-end step (see the module docstring).

    ``bf16``: the student's and the teacher's forwards run under bf16 autocast (the loss never
    does: it upcasts both logits to float32). ``compile``: compile as described above;
    ``compile_teacher`` and ``cuda_graphs`` only matter with it.
    """
    graphed = uses_cuda_graphs(compile, cuda_graphs, device)

    def student_loss(ids: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s_logits = logits_of(student(ids))
        return distill_loss(s_logits, t_logits, loss), s_logits.detach()

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return logits_of(teacher(ids))

    if not compile:
        return _no_grad(teacher_logits), student_loss
    options = {"mode": "reduce-overhead"} if graphed else None
    compiled_loss = torch.compile(student_loss, backend="dbllm", fullgraph=True, options=options)
    if not compile_teacher:
        return _no_grad(teacher_logits), compiled_loss
    compiled_teacher = torch.compile(teacher_logits, mode="reduce-overhead" if graphed else None)

    def teacher_call(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = compiled_teacher(ids)
        return out.clone() if graphed else out  # out of the graph's pool: the student's replay must not reuse it

    return teacher_call, compiled_loss


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(ids)

    return call
