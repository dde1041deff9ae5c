"""Batch-1 dual-binary linears launched with programmatic dependent launch (``options["pdl"]``).

In a graph whose ``db_linear_gpu`` / ``db_glu_gpu`` calls read one row of fp16 activations on a
CUDA device of compute capability 9.0 or later (a decode step at batch 1), those calls become
``dbllm::db_gemv_pdl`` (:mod:`dbllm_compile.backends.triton.pdl_op`): the gemv launched with
PDL. The backend then compiles the graph with Inductor's PDL code generation
(``torch._inductor.config.triton.enable_pdl``), so the kernels on both sides of each gemv
overlap their launch with the kernel before them: PDL pays only when both sides use it
(``docs/decode.md``).

``"auto"`` (default) does this where the device and the Inductor version support it; ``True``
raises a :class:`~dbllm_compile.errors.ConfigError` naming what is missing instead; ``False``
never does it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from dbllm_compile.errors import ConfigError

from .diagnostics import GraphRecord

__all__ = ["use_pdl_gemv", "inductor_supports_pdl"]


def inductor_supports_pdl() -> bool:
    """Whether this torch's Inductor has PDL code generation (``config.triton.enable_pdl``)."""
    from torch._inductor import config

    return hasattr(config.triton, "enable_pdl")


def _one_row_fp16_cuda(x: Any) -> torch.device | None:
    """The device of ``x``'s example value if it is one row of fp16 activations on CUDA."""
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("example_value", x.meta.get("val"))
    if not isinstance(val, torch.Tensor) or val.device.type != "cuda" or val.dtype != torch.float16:
        return None
    shape = tuple(val.shape)
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return val.device if rows == 1 else None


def use_pdl_gemv(gm: fx.GraphModule, record: GraphRecord, setting: bool | str) -> bool:
    """Rewrite the batch-1 gemv calls of ``gm`` to ``db_gemv_pdl`` (module docstring); True if any.

    Counts ``record.lowered["db_gemv_pdl"]``.
    """
    if setting is False:
        return False
    pdl_op = getattr(torch.ops.dbllm, "db_gemv_pdl", None)
    targets = {}
    for name, glu in (("db_linear_gpu", False), ("db_glu_gpu", True)):
        op = getattr(torch.ops.dbllm, name, None)
        if op is not None:
            targets[op.default] = glu
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    chosen = []
    for node in nodes:
        device = _one_row_fp16_cuda(node.args[0] if node.args else node.kwargs.get("x"))
        if device is not None:
            chosen.append((node, device))
    if not chosen:
        return False
    missing = None
    if pdl_op is None:
        missing = "the Triton kernels (pip install 'dbllm-compile[triton]')"
    elif not inductor_supports_pdl():
        missing = f"Inductor's PDL code generation (torch {torch.__version__} has no config.triton.enable_pdl)"
    elif any(torch.cuda.get_device_capability(d)[0] < 9 for _, d in chosen):
        missing = "a GPU of compute capability 9.0 or later (Hopper)"
    if missing is not None:
        if setting is True:
            raise ConfigError(f"torch.compile backend 'dbllm': options['pdl']=True needs {missing}; "
                              "use options['pdl']='auto' or False")
        return False
    for node, _ in chosen:
        glu = targets[node.target]
        args = list(node.args) + [node.kwargs[k] for k in ("x", "qweight", "scales", "bias", "in_features",
                                                           "group_size") if k in node.kwargs]
        node.target = pdl_op.default
        node.args = tuple(args[:6]) + (glu,)
        node.kwargs = {}
        record.lowered["db_gemv_pdl"] += 1
    gm.graph.lint()
    return True
