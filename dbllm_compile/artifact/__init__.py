"""Compiled artifacts of a deployed model (installed as ``dbllm_compile.artifact``).

- :mod:`.checkpoint`: the dbllm checkpoint directory (``model.safetensors`` + ``dbllm.json``),
  written atomically.
"""

from dbllm_compile.artifact.checkpoint import ARTIFACT_VERSION, save_deployed

__all__ = ["ARTIFACT_VERSION", "save_deployed"]
