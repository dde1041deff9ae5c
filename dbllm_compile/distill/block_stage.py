"""Block-wise reconstruction: stage 2 of LBLLM, the block-wise QAT stage before end-to-end distillation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.distill.blocks import capture, extract_block
from dbllm_compile.distill.checkpoint import MetricsLog, save_checkpoint
from dbllm_compile.distill.train import (
    DistillConfig, _autocast, _batch_indices, _device_of, _freeze_all_but, _lr_factor, _load_params, _load_state,
    _optimizer, _param_state, _strip_for_autocast, _weights_config, trainable_parameters,
)

__all__ = ["train_blocks"]


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
