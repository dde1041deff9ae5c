"""Distillation of a dual-binary student against its full-precision teacher.

- :mod:`~dbllm_compile.distill.calibration`: data-free calibration text written by the teacher
  (cached on disk), or a user corpus.
- :mod:`~dbllm_compile.distill.losses`: plain KL, cross-entropy and DAD-ED (our
  deviation-aware distillation loss).
- :mod:`~dbllm_compile.distill.blocks`: transformer blocks of the exported graph as modules.
- :mod:`~dbllm_compile.distill.train`: the block-wise and end-to-end stages (resumable).
- :mod:`~dbllm_compile.distill.pipeline`: :func:`distill`, both stages in one call.
"""

from dbllm_compile.distill.calibration import CalibrationData, CalibrationSpec, generate_calibration
from dbllm_compile.distill.losses import LossSpec, dad_weights, distill_loss
from dbllm_compile.distill.pipeline import DistillResult, distill
from dbllm_compile.distill.train import DistillConfig

__all__ = ["CalibrationData", "CalibrationSpec", "DistillConfig", "DistillResult", "LossSpec",
           "dad_weights", "distill", "distill_loss", "generate_calibration"]
