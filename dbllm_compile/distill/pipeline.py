"""``dbllm_compile.distill``: the whole distillation pipeline in one call.

    student = dbllm_compile.quantize(model, (ids,), config, example_kwargs={"use_cache": False})
    data = generate_calibration(model, CalibrationSpec(num_sequences=64, seq_len=256))
    result = dbllm_compile.distill(student, model, data.input_ids, DistillConfig(), out_dir="run/")

Stages: block-wise reconstruction (``block_steps`` per block), then end-to-end distillation with
the DAD-ED loss (``steps``). ``out_dir`` receives ``checkpoint.pt`` (atomic, resumable),
``metrics.jsonl`` and the PNG plots; running the same call again after a kill resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.distill.checkpoint import MetricsLog, load_checkpoint
from dbllm_compile.distill.train import DistillConfig, train_blocks, train_end_to_end
from dbllm_compile.errors import DBLLMError

__all__ = ["DistillResult", "distill", "distill_w2a4"]


@dataclass
class DistillResult:
    """What a distillation run did.

    Attributes:
        block_records: per block, relative reconstruction error before/after and seconds.
        losses: end-to-end loss per step.
        seconds: wall time per stage.
        out_dir: where checkpoint, metrics and plots were written (or None).
    """

    block_records: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"block_records": self.block_records, "losses": self.losses, "seconds": self.seconds,
                "out_dir": None if self.out_dir is None else str(self.out_dir)}


def distill(
    student: DBLLMModel,
    teacher: torch.nn.Module | Callable[[torch.Tensor], Any],
    data: torch.Tensor,
    config: DistillConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> DistillResult:
    """Distil ``student`` (the output of :func:`dbllm_compile.quantize`) against ``teacher``.

    Args:
        student: a ``DBLLMModel`` in the train stage; trained in place.
        teacher: the full-precision model (called as ``teacher(ids)``; Hugging Face models get
            ``use_cache=False``).
        data: calibration token ids ``[N, T]`` (e.g. from
            :func:`~dbllm_compile.distill.calibration.generate_calibration`).
        config: a :class:`DistillConfig`.
        out_dir: directory for ``checkpoint.pt``, ``metrics.jsonl`` and plots; a run with the
            same ``out_dir`` resumes from its checkpoint.
    """
    config = config or DistillConfig()
    if not isinstance(student, DBLLMModel) or student.stage != "train":
        raise DBLLMError("distill() takes the output of quantize() (a DBLLMModel in the 'train' stage)")
    if data.dim() != 2 or data.dtype != torch.long:
        raise DBLLMError(f"distill() data must be token ids of shape [N, T] and dtype int64, got {tuple(data.shape)} {data.dtype}")
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoint.pt" if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "distill_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        state = load_checkpoint(ckpt)
        if state is not None and state.get("data_shape") not in (None, list(data.shape)):
            raise DBLLMError(f"checkpoint {str(ckpt)!r} was made with data of shape {state['data_shape']}, not "
                             f"{list(data.shape)}; use another out_dir or delete the checkpoint")
    metrics = MetricsLog(out / "metrics.jsonl" if out else None)
    result = DistillResult(out_dir=out)

    call_teacher = teacher
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "config") and hasattr(teacher, "generation_config"):
        call_teacher = lambda ids: teacher(ids, use_cache=False)  # noqa: E731
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()

    t0 = time.perf_counter()
    result.block_records = train_blocks(student, data, config, checkpoint=ckpt, metrics=metrics, progress=progress)
    result.seconds["blocks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.losses = train_end_to_end(
        student, call_teacher, data, config, checkpoint=ckpt, metrics=metrics, progress=progress,
        extra_state={"block_records": result.block_records, "data_shape": list(data.shape)},
    )
    result.seconds["e2e"] = time.perf_counter() - t0
    if out and plots:
        from dbllm_compile.distill.plots import plot_run

        # the file, not this process's records: a resumed run's plots cover the whole run
        plot_run(_read_jsonl(out / "metrics.jsonl") or metrics.records, result, out)
    return result


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def distill_w2a4(
    student: DBLLMModel,
    teacher: torch.nn.Module | Callable[[torch.Tensor], Any],
    data: torch.Tensor,
    weights: DistillConfig | None = None,
    activations: DistillConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    on_stage_end: Callable[[str, DBLLMModel], None] | None = None,
    weights_from: str | Path | None = None,
    act_group_size: int | None = None,
) -> dict[str, DistillResult]:
    """The three decoupled stages of W(1+1)A4 (LBLLM), on a model from :func:`dbllm_compile.quantize`.

    1. ``"init"``: ``student`` as given: post-training initialisation, 16-bit activations.
    2. ``"weights"``: :func:`distill` with ``weights`` (block-wise + end to end), activations in
       full precision.
    3. ``"activations"``: :func:`dbllm_compile.add_activation_quant` inserts the 4-bit activation
       quantizers, then end-to-end distillation with ``activations`` trains their clip factors
       only (weights frozen, no block-wise stage: its targets would be the trained latents).

    Each stage checkpoints in its own sub-directory of ``out_dir`` (``stage2-weights/``,
    ``stage3-activations/``); calling again with the same arguments resumes (a finished stage
    restores its final parameters from its checkpoint). ``on_stage_end(name, student)`` is
    called after each stage (e.g. to evaluate perplexity per stage).

    ``weights_from``: the ``out_dir`` (or ``checkpoint.pt``) of a finished 16-bit-activation
    :func:`distill` run of the same model, data and ``weights`` config (e.g. the W2A16 recipe):
    stage 2 starts from its checkpoint instead of training again (copied into
    ``stage2-weights/`` when that has no checkpoint yet; a run that stopped early resumes the
    remaining steps). Needs ``out_dir``.

    ``act_group_size``: granularity of the activation scales inserted by stage 3 (0: per token;
    ``G``: per token and group of ``G`` input features), passed to
    :func:`~dbllm_compile.add_activation_quant`; ``None`` (default) takes
    ``student.config.activation_group_size``. Checked against every layer before stage 2, so
    a group size that does not divide some layer's input features fails before any training.
    """
    import dataclasses

    from dbllm_compile.api import add_activation_quant

    if student.config.activation_bits != 16:
        raise DBLLMError("distill_w2a4() takes a model quantized with activation_bits=16: the activation "
                         "quantizers are inserted by stage 3, after the weights were distilled")
    from dbllm_compile.passes.activation_quant import check_activation_group_size

    if act_group_size is None:
        act_group_size = student.config.activation_group_size
    check_activation_group_size(student.graph_module, act_group_size)  # before hours of training
    weights = weights or DistillConfig()
    activations = activations or DistillConfig(steps=100)
    activations = dataclasses.replace(activations, train_weights=False, train_activation=True, block_steps=0)
    weights = dataclasses.replace(weights, train_activation=False)
    out = Path(out_dir) if out_dir is not None else None
    if weights_from is not None:
        if out is None:
            raise DBLLMError("distill_w2a4(weights_from=...) needs out_dir: the checkpoint is copied into its stage2-weights/")
        _seed_weights_stage(Path(weights_from), out / "stage2-weights")
    if on_stage_end:
        on_stage_end("init", student)
    results = {"weights": distill(student, teacher, data, weights, out_dir=out / "stage2-weights" if out else None,
                                  progress=progress, plots=plots)}
    if on_stage_end:
        on_stage_end("weights", student)
    add_activation_quant(student, group_size=act_group_size)
    if on_stage_end:
        on_stage_end("activations-init", student)
    results["activations"] = distill(student, teacher, data, activations,
                                     out_dir=out / "stage3-activations" if out else None, progress=progress, plots=plots)
    if on_stage_end:
        on_stage_end("activations", student)
    return results


def _seed_weights_stage(source: Path, stage_dir: Path) -> None:
    """Copy the end-to-end checkpoint of a finished W2A16 run into ``stage_dir`` (atomically),
    unless ``stage_dir`` already has a checkpoint (a resumed W(1+1)A4 run keeps its own)."""
    import os
    import shutil

    src = source / "checkpoint.pt" if source.is_dir() else source
    dst = stage_dir / "checkpoint.pt"
    if dst.is_file():
        return
    state = load_checkpoint(src)
    if state is None:
        raise DBLLMError(f"weights_from={str(source)!r}: no checkpoint at {str(src)!r}; pass the out_dir of a "
                         f"distill() run (the CLI's OUT-run directory)")
    if state.get("stage") != "e2e":
        raise DBLLMError(f"weights_from={str(source)!r}: its checkpoint is from the {state.get('stage')!r} stage; "
                         f"let that run reach its end-to-end stage first (run it again to resume)")
    if any(name.endswith("_act_clip") for name in state.get("params", {})):
        raise DBLLMError(f"weights_from={str(source)!r} holds activation clip factors: pass a run with 16-bit "
                         f"activations (stage 2 of W(1+1)A4 trains the weights only)")
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".copy")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
