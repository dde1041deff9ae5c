"""The ``"dbllm"`` torch.compile backend: rewrite the linears, lower the rest with Inductor.

``torch.compile(model, backend="dbllm", options={...})`` calls :func:`dbllm_backend` once per
graph Dynamo captures, as ``dbllm_backend(gm, example_inputs, options=...)`` (``torch.compile``
takes ``mode=`` or ``options=``, not both: with options, the mode is ``options["mode"]``). Per
graph:

1. mode choice: a graph holding dual-binary ops (a model from ``quantize()``/``convert()``) is
   *lowered* as it is; any other graph gets its linears *quantized* on the fly
   (``options["quantize"]`` overrides);
2. the rewrites of :mod:`.lowering`, then the fusions of :mod:`.fusion`: a gated MLP's
   ``silu(gate(x)) * up(x)`` into one ``db_glu_gpu`` call (``options["fuse_glu"]``), and
   sibling ``db_linear_gpu`` calls on one activation into one call (``options["fuse_siblings"]``);
   batch-1 gemvs launched with PDL (:mod:`.pdl`, ``options["pdl"]``), which also turns on
   Inductor's PDL code and its combo kernels for the graph (``inductor_options`` can turn
   either off);
3. ``torch._inductor.compile_fx.compile_fx`` with the config patches of ``mode``
   (``"reduce-overhead"``: CUDA graphs) and ``options["inductor_options"]``; training graphs
   (inputs that require grad) go through AOTAutograd inside ``compile_fx``.

The function is reached through the ``torch_dynamo_backends`` entry point (see
``pyproject.toml``); importing this module registers nothing, so importing dbllm_compile and
resolving the entry point never register the name twice.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import fx

from dbllm_compile.ops import DEPLOY_OP, TRAIN_OP

from .diagnostics import GraphRecord, record_graph
from .fusion import fuse_glu_linears, fuse_sibling_linears
from .lowering import lower_dbllm_ops, quantize_graph
from .options import CompileOptions
from .pdl import use_pdl_gemv

__all__ = ["dbllm_backend", "BACKEND_NAME", "register"]

BACKEND_NAME = "dbllm"


def _has_dbllm_ops(gm: fx.GraphModule) -> bool:
    gpu = getattr(torch.ops.dbllm, "db_linear_gpu", None)
    targets = {TRAIN_OP, DEPLOY_OP} | ({gpu.default} if gpu is not None else set())
    return any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def _compile_id() -> tuple[str, bool]:
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None:
        return "?", False
    return str(cid), bool(cid.frame_compile_id)


def dbllm_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    *,
    options: Mapping[str, Any] | CompileOptions | None = None,
    mode: str | None = None,
) -> Any:
    """Compile one Dynamo graph (see the module docstring); returns the compiled callable.

    Example::

        cmodel = torch.compile(model, backend="dbllm", options={"init": "mse"})
        with torch.no_grad():
            logits = cmodel(ids).logits
    """
    opts = CompileOptions.from_options(options)
    t0 = time.perf_counter()
    compile_id, recompile = _compile_id()
    training = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    has_ops = _has_dbllm_ops(gm)
    quantize = opts.quantize == "always" or (opts.quantize == "auto" and not has_ops)
    record = GraphRecord(compile_id=compile_id, recompile=recompile,
                         mode="quantize" if quantize else ("lower" if has_ops else "passthrough"),
                         training=training)
    if quantize:
        quantize_graph(gm, example_inputs, opts, record)
    lower_dbllm_ops(gm, example_inputs, opts, record)
    if opts.fuse_glu:
        fuse_glu_linears(gm, record)
    if opts.fuse_siblings:
        fuse_sibling_linears(gm, record)
    pdl = not training and use_pdl_gemv(gm, record, opts.pdl)  # (the PDL op has no backward)
    if record.mode == "quantize" and not record.rewritten:
        record.mode = "passthrough"
    gm.recompile()
    record.seconds = time.perf_counter() - t0
    record_graph(record)
    if not opts.inductor:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    mode = mode or opts.mode
    patches: dict[str, Any] = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    if record.lowered.get("db_linear_train:decomposed"):
        # Faithful low-precision casts in fused kernels where the version honours the flag. The
        # scales' rounding does not rely on it (torch 2.11 ignored it): the decomposition rounds
        # them with integer ops (train_decomposition.round_like_cast).
        patches["emulate_precision_casts"] = True
    if pdl:  # PDL pays only when the kernels on both sides of a launch use it
        patches["triton.enable_pdl"] = True
        # a batch-1 decode graph is launch-bound between its gemvs: Inductor's combo kernels put
        # independent small kernels (rope of q and k, the cache writes) into one launch
        patches["combo_kernels"] = True
    patches.update(opts.inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def register() -> bool:
    """Register ``"dbllm"`` with Dynamo unless it is already known (entry point or earlier call).

    Only needed where dbllm_compile is imported from a source tree that was never installed
    (no entry point); an installed package resolves the name lazily by its entry point.
    Returns whether this call registered it.
    """
    from torch._dynamo.backends import registry

    registry._lazy_import()
    if BACKEND_NAME in registry._BACKENDS or BACKEND_NAME in registry._COMPILER_FNS:
        return False
    registry.register_backend(compiler_fn=dbllm_backend, name=BACKEND_NAME)
    return True
