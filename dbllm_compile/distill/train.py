"""The two training stages: block-wise reconstruction, then end-to-end distillation.

Both train only the dual-binary parameters: the scales ``a1``, ``a2`` (and the offset ``c`` of the
sign codebook, with the scales' learning rate) always, the latent weights
(through the straight-through estimator) when ``DistillConfig.train_latent``; every other
parameter is frozen. Both checkpoint atomically and resume: a run killed at any point and
started again with the same arguments ends with the same parameters as an uninterrupted run
(the data order is a pure function of the seed and the step; no other randomness is used).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.distill.blocks import capture, extract_block
from dbllm_compile.distill.checkpoint import MetricsLog, load_checkpoint, save_checkpoint
from dbllm_compile.profiling import profiler, top_ops
from dbllm_compile.distill.losses import LossSpec, dad_weights
from dbllm_compile.distill.step import build_step, mark_step, uses_cuda_graphs
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


# ----------------------------------------------------------------------------- block-wise


def _rel_mse(out: tuple, ref: tuple) -> torch.Tensor:
    """``||out - ref||^2 / ||ref||^2`` over every tensor output of a block."""
    num = sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(out, ref) if isinstance(o, torch.Tensor))
    den = sum((r.float() ** 2).sum() for r in ref if isinstance(r, torch.Tensor))
    return num / den.clamp_min(1e-12)


def _token_rel_mse(out: tuple, ref: tuple) -> torch.Tensor:
    """Mean over tokens (every position of every tensor output) of the relative squared error
    of that token's feature vector (the last dimension).

    Residual streams of LLMs carry a few *massive activations* (SmolLM2-135M: ~2e4 in one
    feature of a few tokens from block 11 on, against a median magnitude of ~2); the global
    relative error is then almost only the error on those tokens. The next block normalises
    every token (RMSNorm), so what it sees is each token's relative error: weight tokens equally.
    """
    terms = []
    for o, r in zip(out, ref):
        if not isinstance(o, torch.Tensor) or o.dim() == 0:
            continue
        o32, r32 = o.float(), r.float()
        num = ((o32 - r32) ** 2).sum(-1)
        den = (r32 ** 2).sum(-1)
        terms.append((num / den.clamp_min(1e-12)).flatten())
    return torch.cat(terms).mean()


def _channel_rel_mse(out: tuple, ref: tuple) -> torch.Tensor:
    """Mean over features (the last dimension of every tensor output) of each feature's relative
    squared error over all tokens of the batch: ``mean_c sum_t (y_q - y)[t, c]^2 / sum_t y[t, c]^2``.

    Where the global loss is dominated by the one feature that carries a massive activation
    (when the quantized block misses it) or hides every other feature behind it (when it is
    reproduced), this weights every hidden channel equally, whatever its scale.
    """
    terms = []
    for o, r in zip(out, ref):
        if not isinstance(o, torch.Tensor) or o.dim() == 0:
            continue
        o32, r32 = o.float().reshape(-1, o.shape[-1]), r.float().reshape(-1, r.shape[-1])  # [tokens, C]
        num = ((o32 - r32) ** 2).sum(0)
        den = (r32 ** 2).sum(0)
        terms.append(num / den.clamp_min(1e-12))
    return torch.cat(terms).mean()


def _last_use(blocks: list) -> dict[str, int]:
    """For each block boundary node name, the index in ``blocks`` of the last block that reads it,
    as an input or as a target (one of its outputs).

    Once block ``i`` is done, the values whose last use is ``<= i`` are no longer needed: a
    block's outputs are inputs of the blocks after it and live until the last of them; values
    read by every block (rotary tables, masks) live to the end.
    """
    last: dict[str, int] = {}
    for index, block in enumerate(blocks):
        for name in (*block.inputs, *block.outputs):
            last[name] = index
    return last


def _nbytes(values: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))


def _free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device: the driver's free memory plus PyTorch's cached, unused blocks."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class _HostArena:
    """Host memory for the captured values of one boundary node, carved out of large chunks.

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two: pinning each
    captured value on its own would take up to twice its size (8 MiB for a 4.5 MiB hidden state).
    The values are carved, in order, out of chunks whose size is a power of two and holds at least
    16 of them, so little is wasted (under 1/16 of each chunk, and the end of the last); a chunk is freed with the last value carved out of it (values of one node are freed
    together, after the last block that reads the node).
    """

    ALIGN = 512  # bytes; a multiple of every element size

    def __init__(self, pin: bool):
        self.pin = pin
        self.chunk: torch.Tensor | None = None
        self.used = 0

    def store(self, value: torch.Tensor) -> torch.Tensor:
        """A contiguous host copy of the contiguous tensor ``value`` (same shape, dtype, values)."""
        nbytes = value.numel() * value.element_size()
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        if self.chunk is None or self.used + size > self.chunk.numel():
            chunk_bytes = 1 << max(16 * size - 1, 1).bit_length()  # room for 16 to 31 values
            self.chunk = torch.empty(chunk_bytes, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
            self.used = 0
        host = self.chunk[self.used : self.used + nbytes].view(value.dtype).view(value.shape)
        self.used += size
        host.copy_(value)
        return host


def _to_host(value: Any, arena: _HostArena | None = None) -> Any:
    """``value`` in host memory with the same values and dtype: from CUDA, pinned (so that copying
    it back can be asynchronous) and, when contiguous, stored in ``arena``. Non-tensors and tensors
    already on the CPU are returned as they are."""
    if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
        return value
    if value.device.type != "cuda":
        return value.cpu()
    if arena is not None and value.is_contiguous():
        return arena.store(value)
    return value.cpu().pin_memory()  # keeps the strides of dense tensors


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _run(module: torch.nn.Module, args: list[Any], device: torch.device, cfg: "DistillConfig") -> Any:
    """``module(*args)`` under the stage's autocast (the loss is computed by the caller, outside it)."""
    with _autocast(device, cfg.autocast):
        return module(*args)


def train_blocks(
    student: DBLLMModel,
    data: torch.Tensor,
    cfg: DistillConfig,
    *,
    checkpoint: Path | None = None,
    metrics: MetricsLog | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Block-wise reconstruction (stage 2 of LBLLM; block-wise QAT).

    For each block in order: inputs are the outputs of the already-trained quantized blocks
    before it (the teacher's values for everything else: rotary tables, masks, the embedding);
    the target is the full-precision block output on the full-precision input. The loss is the
    relative squared error over the whole batch (``block_loss="global"``) or per token, averaged
    over tokens (``"token"``). Returns, per block, the error before and after training
    (the data of the per-layer reconstruction plot).

    Must run before any latent weight is trained: the teacher's block outputs are computed from
    the latent weights as dense weights (see :func:`~dbllm_compile.distill.blocks.capture`).

    Memory: the teacher's values at every block boundary are captured for every batch before the
    first block trains, on the device or in host memory (``DistillConfig.block_offload``; the
    choice and the estimated size are logged once to ``metrics``). Each value, the teacher's or
    the quantized path's, is freed once the last block that reads it is done (:func:`_last_use`),
    so the quantized path holds one block boundary at a time.
    """
    from tqdm.auto import tqdm

    metrics = metrics or MetricsLog(None)
    blocks = [b for b in student.report.blocks if b.linears]
    if not blocks or cfg.block_steps == 0 or not cfg.train_weights:  # the block stage trains weights
        return []
    gm = student.graph_module
    device = _device_of(student)
    state = _load_state(checkpoint, student)
    if state is not None and state.get("stage") != "blocks":
        return list(state.get("block_records", []))  # a later stage's checkpoint: this stage is done
    stripped = _strip_for_autocast(cfg, student)  # before the teacher capture and extract_block copy nodes
    if stripped is not None:
        metrics.log(stage="blocks", autocast=cfg.autocast, dtype_assertions_removed=stripped)
    done = int(state["next_block"]) if state else 0
    records: list[dict[str, Any]] = list(state["records"]) if state else []

    block_loss = {"global": _rel_mse, "token": _token_rel_mse, "channel": _channel_rel_mse}[cfg.block_loss]  # looked up per call
    bs = cfg.block_batch_size
    if cfg.block_sequences:
        data = data[: cfg.block_sequences]
    batches = [data[i : i + bs].to(device) for i in range(0, data.shape[0], bs)]
    boundary = sorted({n for b in blocks for n in (*b.inputs, *b.outputs)})
    last_use = _last_use(blocks)
    free = _free_memory(device) if device.type == "cuda" else 0  # before anything is captured
    offload = cfg.block_offload == "cpu"
    teacher: list[dict[str, Any]] = []
    arenas = {name: _HostArena(pin=True) for name in boundary} if device.type == "cuda" else {}
    for ids in tqdm(batches, desc="teacher block boundaries", disable=not progress, leave=False):
        with _autocast(device, cfg.autocast):
            values = capture(gm, (ids,), student.fixed_kwargs, boundary, dense=True)
        if not teacher:  # the first batch: estimate the whole capture, choose where to keep it, say so
            estimate = _nbytes(values) * len(batches)
            if cfg.block_offload == "auto":
                offload = device.type == "cuda" and estimate > 0.25 * free
            metrics.log(stage="blocks", block_offload="cpu" if offload else "none", teacher_bytes=estimate,
                        **({"free_bytes": free} if device.type == "cuda" else {}))
            if offload and progress:
                tqdm.write(f"block-wise stage: teacher block boundaries (~{estimate / 2**30:.2f} GiB) kept in host memory")
        if offload:
            for name in list(values):
                values[name] = _to_host(values[name], arenas.get(name))
        teacher.append(values)
    del arenas  # each chunk now lives as long as the values carved out of it
    chain: list[dict[str, Any]] = [dict() for _ in batches]  # quantized-path values by node name
    if state:  # after the capture: the teacher is the dense latent weights before any training
        _load_params(student, state["params"])

    scales_all, latents_all = trainable_parameters(gm, cfg.train_latent)
    bar = tqdm(total=len(blocks) * cfg.block_steps, initial=done * cfg.block_steps, desc="block-wise",
               disable=not progress, unit="step")
    for index, block in enumerate(blocks):
        module = extract_block(gm, block)
        scales, latents = trainable_parameters(module, cfg.train_latent)

        def inputs(b: int) -> list[Any]:
            return [chain[b][n] if n in chain[b] else _to_device(teacher[b][n], device) for n in block.inputs]

        def targets(b: int) -> tuple:
            return tuple(_to_device(teacher[b][n], device) for n in block.outputs)

        if index >= done:
            _freeze_all_but(gm, [*scales.values(), *latents.values()])
            opt = _optimizer(scales, latents, cfg.block_lr, cfg.block_latent_lr)
            with torch.no_grad():
                before = float(sum(block_loss(_run(module, inputs(b), device, cfg), targets(b))
                                   for b in range(len(batches))) / len(batches))
            t0 = time.perf_counter()
            for step in range(cfg.block_steps):
                b = int(_batch_indices(step, 1, len(batches), cfg.seed + 7919 * index)[0])
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * _lr_factor(step, cfg.block_steps, cfg.warmup)
                loss = block_loss(_run(module, inputs(b), device, cfg), targets(b))  # float32, outside autocast
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_([*scales.values(), *latents.values()], cfg.clip_grad)
                opt.step()
                bar.update(1)
                bar.set_postfix(block=block.name, loss=f"{loss.item():.4g}")
                metrics.log(stage="blocks", block=block.name, step=step, loss=loss.item())
            del loss
            with torch.no_grad():
                after = float(sum(block_loss(_run(module, inputs(b), device, cfg), targets(b))
                                  for b in range(len(batches))) / len(batches))
            records.append({"block": block.name, "before": before, "after": after,
                            "seconds": time.perf_counter() - t0})
            metrics.log(stage="blocks", block=block.name, rel_err_before=before, rel_err_after=after)
            if checkpoint:
                names = [*scales_all, *latents_all]
                save_checkpoint(checkpoint, {"stage": "blocks", "next_block": index + 1, "records": records,
                                             "params": _param_state(student, names),
                                             "weights_config": _weights_config(student)})
        # trained or (on resume) replayed: push the outputs that later blocks read into the quantized
        # path, then free every value of this batch that no later block reads
        wanted = [k for k, name in enumerate(block.outputs) if last_use[name] > index]
        dead = [name for name, last in last_use.items() if last == index]
        with torch.no_grad(), _autocast(device, cfg.autocast):
            for b in range(len(batches)):
                if wanted:
                    out = module(*inputs(b))
                    for k in wanted:
                        chain[b][block.outputs[k]] = out[k]
                    del out
                for name in dead:
                    teacher[b].pop(name, None)
                    chain[b].pop(name, None)
    bar.close()
    for p in gm.parameters():
        p.requires_grad_(True)
    return records


# ----------------------------------------------------------------------------- end to end


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
    teacher_logits, student_loss = build_step(
        student, teacher, cfg.loss, bf16=cfg.autocast == "bf16", device=device, compile=cfg.compile,
        compile_teacher=cfg.compile_teacher, cuda_graphs=cfg.cuda_graphs)
    if cfg.compile:
        metrics.log(stage="e2e", compiled=True, compile_teacher=cfg.compile_teacher, cuda_graphs=graphed)
    bar = tqdm(total=cfg.steps, initial=step0, desc="distill", disable=not progress, unit="step")
    t_last, tokens = time.perf_counter(), 0
    t_ckpt = t_last
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
