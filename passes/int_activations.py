"""Rewrite a deployed W(1+1)A4 graph so the int8 activation codes travel between the ops.

Before (what ``convert`` produces for ``activation_bits=4``)::

    x_hat = dbllm.act_quant(x, r)                        # fake-quantized, dtype of x
    y_i   = dbllm.db_linear(x_hat, packed_i, a1_i, ...)  # for each sibling linear i

After :func:`use_int_activations`::

    codes, scale = dbllm.act_quant_int(x, r)             # int8 [..., K], float32 [..., 1]
    y_i = dbllm.db_linear_a4(codes, scale, packed_i, a1_i, ..., out_dtype=x.dtype, c=c_i)

Same function bit for bit with the reference ops (:mod:`dbllm_compile.ops_int`); on CUDA the
codes come from one quantization kernel per shared activation and each linear runs the int8
GEMM. Only linears that read the quantizer's output *directly* are rewritten; a linear reading
it through a view (or any other reader) keeps the ``act_quant`` node, which then stays in the
graph for them. Opt-in: artifacts, exports and training keep the ``act_quant``/``db_linear``
form; call this on the ``graph_module`` of a deployed model before running it on a GPU.

Per-token scales only: an ``act_quant`` node with ``group_size > 0`` (one scale per token and
group of input features, ``DBLLMConfig.activation_group_size``) is left alone with all its
linears, because ``act_quant_int`` / ``db_linear_a4`` and the int8 Triton A4 GEMM apply one
activation scale per row. Those linears keep running as ``act_quant`` + ``db_linear`` (correct,
the same numerics, but not the int8 kernel path); each is listed in
:attr:`IntActivationReport.skipped` with the reason, and the quantizers are counted in
:attr:`IntActivationReport.grouped` (the ``dbllm`` Dynamo backend reports them as fallbacks).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from dbllm_compile.ops import ACT_QUANT_OP, DEPLOY_OP, op_arguments
from dbllm_compile.ops_int import ACT_QUANT_INT_OP, DB_LINEAR_A4_OP

__all__ = ["IntActivationReport", "use_int_activations"]


@dataclass
class IntActivationReport:
    """What :func:`use_int_activations` did: quantizers rewritten, linears rewritten, the
    linears left on the fake-quant path with the reason, and the number of quantizers left
    alone because they have per-group scales (``group_size > 0``: no int8 kernel yet)."""

    quantizers: int = 0
    linears: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    grouped: int = 0


def _dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("example_value"))  # exported / Dynamo graphs
    return val.dtype if isinstance(val, torch.Tensor) else None


def use_int_activations(gm: fx.GraphModule) -> IntActivationReport:
    """Rewrite every ``act_quant`` -> ``db_linear`` pair of ``gm`` in place (module docstring)."""
    report = IntActivationReport()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != ACT_QUANT_OP:
            continue
        args = op_arguments(node)
        if args["group_size"]:
            report.grouped += 1
            for user in node.users:
                report.skipped.append((user.name, f"{node.name} has per-group activation scales (group_size="
                                       f"{args['group_size']}); the int8 A4 kernels implement per-token scales "
                                       f"only, so it stays act_quant + db_linear"))
            continue
        direct = [u for u in node.users if u.op == "call_function" and u.target == DEPLOY_OP
                  and op_arguments(u)["x"] is node]
        for other in node.users:
            if other not in direct:
                report.skipped.append((other.name, f"reads {node.name} through {other.target}, not directly"))
        if not direct:
            continue
        dtype = _dtype_of(node) or (_dtype_of(args["x"]) if isinstance(args["x"], fx.Node) else None)
        if dtype is None:
            for u in direct:
                report.skipped.append((u.name, f"no dtype recorded for {node.name} (node.meta['val'] missing)"))
            continue
        with graph.inserting_after(node):
            q = graph.call_function(ACT_QUANT_INT_OP, (args["x"], args["clip_ratio"]))
        with graph.inserting_after(q):
            codes = graph.call_function(operator.getitem, (q, 0))
        with graph.inserting_after(codes):
            scale = graph.call_function(operator.getitem, (q, 1))
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor):
            q.meta["val"] = (torch.empty_like(val, dtype=torch.int8),
                             val.new_empty((*val.shape[:-1], 1), dtype=torch.float32))
            codes.meta["val"], scale.meta["val"] = q.meta["val"]
        for user in direct:
            a = op_arguments(user)
            with graph.inserting_after(user):
                new = graph.call_function(DB_LINEAR_A4_OP, (codes, scale, a["packed"], a["a1"], a["a2"], a["bias"],
                                                            a["in_features"], a["group_size"], dtype, a["c"]))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            graph.erase_node(user)
            report.linears += 1
        if not node.users:
            graph.erase_node(node)
        report.quantizers += 1
    graph.lint()
    gm.recompile()
    return report
