"""Distillation settings (:class:`DistillConfig`) and what the two training stages share.

The stages: block-wise reconstruction (:func:`~dbllm_compile.distill.block_stage.train_blocks`),
then end-to-end distillation (:func:`~dbllm_compile.distill.end_to_end.train_end_to_end`; its
step in :mod:`dbllm_compile.distill.step`); both are re-exported here.

Both train only the dual-binary parameters: the scales ``a1``, ``a2`` (and the offset ``c`` of the
sign codebook, with the scales' learning rate) always, the latent weights
(through the straight-through estimator) when ``DistillConfig.train_latent``; every other
parameter is frozen. Both checkpoint atomically and resume: a run killed at any point and
started again with the same arguments ends with the same parameters as an uninterrupted run
(the data order is a pure function of the seed and the step; no other randomness is used).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.distill.checkpoint import load_checkpoint
from dbllm_compile.distill.losses import LossSpec
from dbllm_compile.errors import ConfigError, DBLLMError
from dbllm_compile.ops import ACT_QUANT_TRAIN_OP, TRAIN_OP, op_arguments
from dbllm_compile.passes.dtype_assertions import strip_dtype_assertions

__all__ = ["DistillConfig", "train_blocks", "train_end_to_end", "trainable_parameters"]


@dataclass(frozen=True)
class DistillConfig:
    """Budgets and hyperparameters of the distillation stages.

    Attributes:
        steps: end-to-end optimizer steps (0 skips the stage).
        batch_size: sequences per end-to-end step.
        lr: peak learning rate of the scales (end-to-end).
        latent_lr: peak learning rate of the latent weights (when ``train_latent``).
        train_latent: also train the latent weights through the STE (lets bits flip).
        train_weights: train the weight parameters (scales, and latents with ``train_latent``);
            False freezes them (stage 3 of W(1+1)A4: only the activation factors learn).
        train_activation: train the clip logits of the 4-bit activation quantizers, when the
            model has any (``activation_bits=4`` or :func:`dbllm_compile.add_activation_quant`).
        activation_lr: peak learning rate of the clip logits (``r = sigmoid(theta)``).
        warmup: fraction of the steps with linear warm-up; then cosine decay to 0.
        clip_grad: global gradient-norm clip (0 disables).
        loss: the end-to-end loss (:class:`~dbllm_compile.distill.losses.LossSpec`).
        block_steps: optimizer steps per block in the block-wise stage (0 skips it).
        block_batch_size: sequences per block-wise step.
        block_sequences: the block-wise stage trains on the first ``block_sequences`` calibration
            sequences only (0, the default: all of them). The teacher's values at every block
            boundary are kept for all the sequences it uses (``block_offload``), so a large
            end-to-end data set needs a cap here (the estimate is logged as ``teacher_bytes`` in
            ``metrics.jsonl``).
        block_lr: peak learning rate of the scales in the block-wise stage.
        block_loss: ``"global"`` (default): ``||y_q - y||^2 / ||y||^2`` over the whole batch, which
            a few tokens with massive activations dominate; ``"token"``: the mean over tokens of
            each token's relative squared error ``||y_q,t - y_t||^2 / ||y_t||^2``. On SmolLM2-135M
            (H100 ablation, docs/results.md) "global" ended at perplexity 198 and "token" at 212
            with the same budget, so "global" stays the default. ``"channel"``: the mean over hidden
            features of each feature's relative squared error over the batch (every channel
            weighted equally, whatever its scale; on the CPU budget 3,777 against 2,076 for
            "global", docs/results.md section 2).
        block_latent_lr: same for the latent weights.
        block_offload: where the block-wise stage keeps the teacher's values at the block
            boundaries (captured for every batch before the first block is trained): ``"auto"``
            (default) moves them to host memory (pinned) when the device is CUDA and their estimated
            size exceeds a quarter of the free GPU memory, and keeps them on the device otherwise;
            ``"cpu"`` always moves them to host memory (pinned on CUDA); ``"none"`` keeps them on
            the device. The values are the same either way, only where they are stored differs.
        seed: seed of the data order.
        checkpoint_every: end-to-end steps between checkpoints.
        checkpoint_seconds: also wait at least this many seconds of wall time since the last
            end-to-end checkpoint before writing the next (0: every ``checkpoint_every`` steps).
            A checkpoint holds the latent weights and the AdamW state (about 1.6 GB for a 135M
            model, 2-4 s each on the H100 machines); the last step always writes one. Which steps
            write one does not change the result of a resumed run, only how much work a kill loses.
        profile_steps: profile that many end-to-end steps (from the 20th step of the run, or the
            5th after a resume) with ``torch.profiler`` and log the ops with the most device time
            (self time, per step) as one ``{"stage": "e2e_profile", ...}`` metrics record.
        autocast: ``"auto"`` (the exported dtype, TF32 matmuls on CUDA; the graph is left as
            exported), ``"bf16"`` (both stages run the student and the teacher under
            ``torch.autocast(device, dtype=torch.bfloat16)``, on CUDA or CPU, after the exported
            graph's dtype assertions are removed; see :func:`_autocast`) or ``"none"`` (the
            exported dtype, no TF32 switch).
        compile: run the end-to-end student forward/backward and the loss as one
            ``torch.compile(..., backend="dbllm")`` graph (training form through AOTAutograd and
            Inductor; see docs/compile.md and :mod:`dbllm_compile.distill.step`).
        compile_teacher: with ``compile``, also compile the teacher's forward (plain Inductor).
        cuda_graphs: with ``compile`` on CUDA, run the compiled teacher and student under CUDA
            graphs (Inductor's ``"reduce-overhead"``): the step was bound by its ~1,300 kernel
            launches (docs/results.md 3.0e). No effect on CPU.
        compile_cache: with ``compile``, a file holding Inductor's compiled code for the step
            (:mod:`dbllm_compile.distill.compile_cache`): loaded before the step is compiled when
            it exists, written after the first step. Carry it to a fresh machine to skip Inductor's
            part of the compile there. ``""`` (default): none.
    """

    steps: int = 100
    batch_size: int = 4
    lr: float = 5e-4  # 2e-4 until 2026-11-24: 2.5x gave -9% on both budgets (docs/results.md 2, 3.0a)
    latent_lr: float = 5e-5
    train_latent: bool = True
    train_weights: bool = True
    train_activation: bool = True
    activation_lr: float = 1e-2
    warmup: float = 0.05
    clip_grad: float = 1.0
    loss: LossSpec = field(default_factory=LossSpec)
    block_steps: int = 40
    block_batch_size: int = 4
    block_sequences: int = 0
    block_lr: float = 5e-4
    block_loss: str = "global"
    block_latent_lr: float = 5e-5
    block_offload: str = "auto"
    seed: int = 0
    checkpoint_every: int = 25
    checkpoint_seconds: float = 0.0
    profile_steps: int = 0
    autocast: str = "auto"
    compile: bool = False
    compile_teacher: bool = True
    cuda_graphs: bool = True
    compile_cache: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "block_steps", "block_sequences", "profile_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"DistillConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "block_batch_size", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DistillConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "latent_lr", "block_lr", "block_latent_lr", "clip_grad", "activation_lr",
                     "checkpoint_seconds"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"DistillConfig.warmup must be in [0, 1), got {self.warmup!r}")
        if self.block_loss not in ("token", "global", "channel"):
            raise ConfigError(f"DistillConfig.block_loss must be 'global', 'token' or 'channel', got {self.block_loss!r}")
        if self.block_offload not in ("auto", "cpu", "none"):
            raise ConfigError(f"DistillConfig.block_offload must be 'auto', 'cpu' or 'none', got {self.block_offload!r}")
        if not isinstance(self.compile_cache, str):
            raise ConfigError(f"DistillConfig.compile_cache must be a file path (str), got {self.compile_cache!r}")
        if self.compile_cache and not self.compile:
            raise ConfigError("DistillConfig.compile_cache caches the compiled step: set compile=True with it "
                              "(on the CLI: --compile, the default with --device cuda)")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ConfigError(f"DistillConfig.autocast must be 'auto', 'bf16' or 'none', got {self.autocast!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 0."""
    w = int(round(warmup * total))
    if step < w:
        return (step + 1) / (w + 1)
    progress = (step - w) / max(1, total - w)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, mode: str):
    """Mixed precision for a stage (``DistillConfig.autocast``).

    ``"auto"``: the exported dtype, TF32 matmuls on CUDA. ``"none"``: the exported dtype.
    ``"bf16"``: ``torch.autocast(device.type, dtype=torch.bfloat16)`` on any device that has it
    (CUDA, and CPU when asked for explicitly). The exported graph asserts the dtypes it was traced
    with (``aten._assert_tensor_metadata``), so a graph meant to run under it must go through
    :func:`_strip_for_autocast` first (both stages do). Under it, the linears and attention run in
    bfloat16 (``dbllm::db_linear_train`` casts its activation only: its latent weights and scales
    stay float32 masters with float32 gradients, see :mod:`dbllm_compile.ops`); the losses are
    computed outside it, in float32.
    """
    if device.type == "cuda" and mode == "auto":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def _strip_for_autocast(cfg: "DistillConfig", *models: Any) -> int | None:
    """With ``cfg.autocast == "bf16"`` only: remove the dtype assertions
    (:func:`~dbllm_compile.passes.dtype_assertions.strip_dtype_assertions`) from every
    ``fx.GraphModule`` in ``models`` (a ``DBLLMModel``'s graph, a graph-module teacher, graph
    modules nested in a module; other callables are left alone), in place and for good: they check
    dtypes only, the values are the same. Returns how many were removed, ``None`` for the other
    modes (nothing is touched)."""
    if cfg.autocast != "bf16":
        return None
    removed = 0
    for model in models:
        if isinstance(model, torch.nn.Module):
            for module in model.modules():
                if isinstance(module, torch.fx.GraphModule):
                    removed += strip_dtype_assertions(module)
    return removed


def _attr(module: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trainable_parameters(gm: torch.fx.GraphModule, train_latent: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(scales, latents)``: the dual-binary parameters of ``gm`` by ``get_attr`` target; the
    scales include the offsets ``c`` of sign-codebook layers (same learning rate)."""
    scales: dict[str, torch.Tensor] = {}
    latents: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == TRAIN_OP:
            args = op_arguments(node)
            for arg in (args["a1"], args["a2"], args["c"]):
                if arg is not None:
                    scales[arg.target] = _attr(gm, arg.target)
            if train_latent:
                latents[node.args[1].target] = _attr(gm, node.args[1].target)
    return scales, latents


def activation_parameters(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The clip logits of the ``act_quant_train`` nodes of ``gm`` by ``get_attr`` target."""
    return {n.args[1].target: _attr(gm, n.args[1].target) for n in gm.graph.nodes
            if n.op == "call_function" and n.target == ACT_QUANT_TRAIN_OP}


def _stage_parameters(gm: torch.fx.GraphModule, cfg: "DistillConfig") -> tuple[dict, dict, dict]:
    """``(scales, latents, clips)`` that a stage trains under ``cfg`` (empty dicts for frozen kinds)."""
    scales, latents = trainable_parameters(gm, cfg.train_latent) if cfg.train_weights else ({}, {})
    clips = activation_parameters(gm) if cfg.train_activation else {}
    if not (scales or latents or clips):
        raise ConfigError(
            "DistillConfig trains nothing on this model: train_weights=False and no activation quantizer "
            "to train (quantize with DBLLMConfig(activation_bits=4) or call dbllm_compile.add_activation_quant)"
        )
    return scales, latents, clips


def _freeze_all_but(gm: torch.nn.Module, keep: list[torch.Tensor]) -> None:
    keep_ids = {id(t) for t in keep}
    for p in gm.parameters():
        p.requires_grad_(id(p) in keep_ids)


def _optimizer(scales: dict, latents: dict, lr: float, latent_lr: float, clips: dict | None = None,
               clip_lr: float = 0.0) -> torch.optim.Optimizer:
    groups = []
    for params, group_lr in ((scales, lr), (latents, latent_lr), (clips or {}, clip_lr)):
        if params:
            groups.append({"params": list(params.values()), "lr": group_lr, "base_lr": group_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0, **_adamw_impl([p for g in groups for p in g["params"]]))


def _adamw_impl(params: list[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` when every parameter is a floating CUDA tensor: one kernel per step instead
    of the multi-tensor ``foreach`` passes (the same update up to rounding order). In the H100
    recipe's end-to-end step (135M latent weights) the foreach AdamW took 15.4 ms of ~176 ms
    (profile of 2026-11-24, docs/results.md 3.0c)."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def _param_state(student: DBLLMModel, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: _attr(student.graph_module, n).detach().cpu().clone() for n in names}


_WEIGHT_KEYS = ("group_size", "codebook", "rotation_block", "scale_dtype")
"""Config fields that give the stored weights their meaning: a checkpoint written under other
values holds tensors of the same names (and often shapes) that mean something else."""


def _weights_config(student: DBLLMModel) -> dict[str, Any]:
    cfg = student.config.to_dict()
    return {k: cfg[k] for k in _WEIGHT_KEYS}


def _load_state(checkpoint: Any, student: DBLLMModel) -> dict[str, Any] | None:
    """The checkpoint's state (``None`` when there is none), refused when it was written for a
    student whose weights mean something else (e.g. a Hadamard-rotated run resumed without the
    rotation). Checkpoints from before the key existed are taken as they are."""
    state = load_checkpoint(checkpoint) if checkpoint else None
    if state is not None and "weights_config" in state:
        mine = _weights_config(student)
        diff = {k: (state["weights_config"].get(k), mine[k]) for k in mine if state["weights_config"].get(k) != mine[k]}
        if diff:
            raise DBLLMError(
                f"checkpoint {str(checkpoint)!r} was written for a student with "
                f"{ {k: a for k, (a, _) in diff.items()} }, this one has { {k: b for k, (_, b) in diff.items()} }: "
                f"quantize with the same settings to resume it, or use a new output directory"
            )
    return state


def _load_params(student: DBLLMModel, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in params.items():
            _attr(student.graph_module, name).copy_(value)


def _order(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_items, generator=g)


def _batch_indices(step: int, batch: int, n_items: int, seed: int) -> torch.Tensor:
    """Indices of the ``step``-th batch: epochs of a seeded permutation, a pure function of ``step``."""
    per_epoch = max(1, n_items // batch)
    epoch, k = divmod(step, per_epoch)
    return _order(n_items, seed, epoch)[k * batch : (k + 1) * batch]


def _device_of(student: DBLLMModel) -> torch.device:
    return next(student.graph_module.parameters()).device


# The stages, after everything they import from this module is defined.
from dbllm_compile.distill.block_stage import train_blocks  # noqa: E402
from dbllm_compile.distill.end_to_end import train_end_to_end  # noqa: E402
