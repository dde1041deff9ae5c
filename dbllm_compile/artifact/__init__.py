"""Compiled artifacts of a deployed model (installed as ``dbllm_compile.artifact``).

One module per concept:

- :mod:`.format`: the dbllm checkpoint format (``model.safetensors`` + ``dbllm.json``), the
  manifest and its checks (version, checksums);
- :mod:`.atomic`: atomic writes (a crash leaves the old artifact or none);
- :mod:`.source`: what the model was made from (architecture, example inputs);
- :mod:`.checkpoint`: :func:`save_deployed`, :func:`read_checkpoint` (no pickle), sizes;
- :mod:`.rebuild`: :func:`load_deployed`: a runnable model from an artifact, no original weights;
  :func:`apply_layers`: an artifact's trained layers copied into a fresh deploy (another dtype).

Example::

    from dbllm_compile.artifact import save_deployed, load_deployed
    save_deployed(dbllm_compile.convert(qmodel), "out/")
    deployed = load_deployed("out/")          # fresh process: no pickle, no source weights
"""

from dbllm_compile.artifact.checkpoint import (
    ArtifactInfo,
    artifact_info,
    load_layers,
    read_checkpoint,
    save_deployed,
)
from dbllm_compile.artifact.format import ARTIFACT_VERSION
from dbllm_compile.artifact.rebuild import apply_layers, load_deployed

__all__ = [
    "ARTIFACT_VERSION",
    "apply_layers",
    "ArtifactInfo",
    "artifact_info",
    "load_deployed",
    "load_layers",
    "read_checkpoint",
    "save_deployed",
]
