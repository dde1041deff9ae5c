"""Distillation of a dual-binary student against its full-precision teacher.

- :mod:`~dbllm_compile.distill.calibration`: data-free calibration text written by the teacher
  (cached on disk), or a user corpus.
- :mod:`~dbllm_compile.distill.losses`: plain KL, cross-entropy and DAD-ED (our
  deviation-aware distillation loss).
- :mod:`~dbllm_compile.distill.blocks`: transformer blocks of the exported graph as modules.
- :mod:`~dbllm_compile.distill.train`: :class:`DistillConfig` and what the stages share.
- :mod:`~dbllm_compile.distill.block_stage`: the block-wise stage (resumable).
- :mod:`~dbllm_compile.distill.end_to_end`: the end-to-end stage (resumable); its step
  (eager, compiled, CUDA graphs) in :mod:`~dbllm_compile.distill.step`, the portable cache of its
  compiled code in :mod:`~dbllm_compile.distill.compile_cache`.
- :mod:`~dbllm_compile.distill.pipeline`: :func:`distill`, both stages in one call; :func:`distill_w2a4`, the three stages of W(1+1)A4.
"""

from dbllm_compile.distill.calibration import CalibrationData, CalibrationSpec, generate_calibration
from dbllm_compile.distill.losses import LossSpec, dad_weights, distill_loss
from dbllm_compile.distill.pipeline import DistillResult, distill, distill_w2a4
from dbllm_compile.distill.train import DistillConfig

__all__ = ["CalibrationData", "CalibrationSpec", "DistillConfig", "DistillResult", "LossSpec",
           "dad_weights", "distill", "distill_loss", "distill_w2a4", "generate_calibration"]
