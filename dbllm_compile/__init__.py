"""dbllm_compile: 2-bit dual-binary (DB-LLM) quantization of any PyTorch model's linears.

Quick start::

    import torch, dbllm_compile
    qmodel = dbllm_compile.quantize(model, (example_ids,), dbllm_compile.DBLLMConfig(group_size=64),
                                    example_kwargs={"use_cache": False})
    ...  # distil / fine-tune qmodel (its scales and latent weights are parameters)
    deployed = dbllm_compile.convert(qmodel)   # packed 2-bit planes + fp16 scales

Importing this package registers the ``torch.ops.dbllm`` operators and, in transformers'
quantizer registry, the quantization method ``"dbllm"`` (so ``from_pretrained`` loads
checkpoints written by :func:`dbllm_compile.artifact.hf.to_hf` + ``save_pretrained``).
"""

from dbllm_compile import ops  # noqa: F401  (registers torch.ops.dbllm.*)
from dbllm_compile import ops_int  # noqa: F401  (registers act_quant_int, db_linear_a4)
from dbllm_compile import backends  # noqa: F401  (registers the CUDA kernels when Triton is installed)
from dbllm_compile.api import DBLLMModel, SizeReport, add_activation_quant, convert, quantize
from dbllm_compile.config import CONFIG_VERSION, DBLLMConfig
from dbllm_compile.errors import (
    ArtifactError,
    ConfigError,
    DBLLMError,
    GraphPassError,
    QuantizationError,
)

__version__ = "0.1.0"


def _register_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from dbllm_compile.artifact.hf import register

        register()


_register_transformers()

__all__ = [
    "CONFIG_VERSION",
    "ArtifactError",
    "ConfigError",
    "DBLLMConfig",
    "DBLLMError",
    "DBLLMModel",
    "GraphPassError",
    "QuantizationError",
    "SizeReport",
    "add_activation_quant",
    "convert",
    "quantize",
    "__version__",
]
