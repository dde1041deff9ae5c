"""End-to-end distillation: the whole student against the teacher's logits (DAD-ED by default)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.distill.checkpoint import MetricsLog, save_checkpoint
from dbllm_compile.distill.compile_cache import load_compile_cache, save_compile_cache
from dbllm_compile.distill.losses import dad_weights
from dbllm_compile.distill.step import build_step, mark_step, uses_cuda_graphs
from dbllm_compile.distill.train import (
    DistillConfig, _autocast, _batch_indices, _device_of, _freeze_all_but, _load_params, _load_state, _lr_factor,
    _optimizer, _param_state, _stage_parameters, _strip_for_autocast, _weights_config,
)
from dbllm_compile.errors import DBLLMError
from dbllm_compile.profiling import profiler, top_ops

__all__ = ["train_end_to_end"]


def train_end_to_end(
    student: DBLLMModel,
    teacher: Callable[[torch.Tensor], Any],
    data: torch.Tensor,
    cfg: DistillConfig,
    *,
    checkpoint: Path | None = None,
    metrics: MetricsLog | None = None,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
) -> list[float]:
    """End-to-end distillation of ``student`` against ``teacher`` on ``data`` (``[N, T]`` ids).

    ``teacher(ids)`` returns logits (or an object with ``.logits``), computed per step without
    gradient and dropped after the step. AdamW with warm-up and cosine decay, gradient
    clipping, mixed precision per ``cfg.autocast`` (with ``"bf16"`` the dtype assertions of the
    student's graph, and of a teacher that is a graph module, are removed first, before
    ``cfg.compile`` compiles the step). Returns the loss of every step (including resumed ones).
    ``extra_state`` is stored in every checkpoint (e.g. the block-wise stage's records).
    """
    from tqdm.auto import tqdm

    metrics = metrics or MetricsLog(None)
    if cfg.steps == 0:
        return []
    if data.shape[0] < cfg.batch_size:
        raise DBLLMError(f"distillation needs at least batch_size={cfg.batch_size} sequences, got {data.shape[0]}")
    gm = student.graph_module
    device = _device_of(student)
    scales, latents, clips = _stage_parameters(gm, cfg)
    params = [*scales.values(), *latents.values(), *clips.values()]
    _freeze_all_but(gm, params)
    opt = _optimizer(scales, latents, cfg.lr, cfg.latent_lr, clips, cfg.activation_lr)
    losses: list[float] = []
    step0 = 0
    state = _load_state(checkpoint, student)
    if state is not None and state.get("stage") == "e2e":
        _load_params(student, state["params"])
        opt.load_state_dict(state["optimizer"])
        step0 = int(state["step"])
        losses = list(state["losses"])
    names = [*scales, *latents, *clips]
    stripped = _strip_for_autocast(cfg, student, teacher)  # before torch.compile: the stripped graph is compiled
    if stripped is not None:
        metrics.log(stage="e2e", autocast=cfg.autocast, dtype_assertions_removed=stripped)
    _autocast(device, cfg.autocast)  # the TF32 switch of "auto"; the step enters bf16 autocast itself
    graphed = uses_cuda_graphs(cfg.compile, cfg.cuda_graphs, device)
    if cfg.compile and cfg.compile_cache:
        loaded = load_compile_cache(cfg.compile_cache)
        metrics.log(stage="e2e", compile_cache_loaded=loaded or {"file": cfg.compile_cache, "bytes": 0})
    teacher_logits, student_loss = build_step(
        student, teacher, cfg.loss, bf16=cfg.autocast == "bf16", device=device, compile=cfg.compile,
        compile_teacher=cfg.compile_teacher, cuda_graphs=cfg.cuda_graphs)
    if cfg.compile:
        metrics.log(stage="e2e", compiled=True, compile_teacher=cfg.compile_teacher, cuda_graphs=graphed)
    bar = tqdm(total=cfg.steps, initial=step0, desc="distill", disable=not progress, unit="step")
    t_last, tokens = time.perf_counter(), 0
    t_ckpt = t_start = t_last
    prof_first = min(step0 + (5 if step0 else 20), cfg.steps) if cfg.profile_steps else cfg.steps
    prof_last = min(prof_first + cfg.profile_steps, cfg.steps)
    prof = None
    for step in range(step0, cfg.steps):
        if step == prof_first and prof_last > prof_first:
            prof = profiler(device)
            prof.__enter__()
        ids = data[_batch_indices(step, cfg.batch_size, data.shape[0], cfg.seed)].to(device)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(step, cfg.steps, cfg.warmup)
        mark_step(graphed)
        t_logits = teacher_logits(ids)
        loss, s_logits = student_loss(ids, t_logits)  # the loss outside autocast, on float32 logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
        opt.step()
        losses.append(loss.item())
        tokens += ids.numel()
        now = time.perf_counter()
        record = {"stage": "e2e", "step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"],
                  "grad_norm": float(gnorm)}
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            record["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
            if cfg.loss.kind == "dad":
                w = dad_weights(t_logits, s_logits, gamma=cfg.loss.gamma)
                record["dad_weight_quantiles"] = torch.quantile(
                    w.flatten().float().cpu(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
            t_last, tokens = now, 0
        if step == step0:  # the compile (and graph recording) is paid here
            record["first_step_seconds"] = now - t_start
            if cfg.compile and cfg.compile_cache:
                record["compile_cache_saved"] = save_compile_cache(cfg.compile_cache)
        metrics.log(**record)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"tok/s": f"{record['tokens_per_s']:.0f}"} if "tokens_per_s" in record else {}))
        del t_logits, s_logits, loss
        if prof is not None and step + 1 == prof_last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.__exit__(None, None, None)
            metrics.log(stage="e2e_profile", first_step=prof_first, steps=prof_last - prof_first,
                        top=top_ops(prof, device, prof_last - prof_first, top=30))
            prof = None
        due = (step + 1) % cfg.checkpoint_every == 0 and time.perf_counter() - t_ckpt >= cfg.checkpoint_seconds
        if checkpoint and (due or step + 1 == cfg.steps):
            t_ckpt = time.perf_counter()
            save_checkpoint(checkpoint, {"stage": "e2e", "step": step + 1, "losses": losses,
                                         "params": _param_state(student, names), "optimizer": opt.state_dict(),
                                         "weights_config": _weights_config(student), **(extra_state or {})})
    bar.close()
    for p in gm.parameters():
        p.requires_grad_(True)
    return losses
