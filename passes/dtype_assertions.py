"""Remove the dtype/metadata assertions that ``torch.export`` traces into a graph.

An exported graph checks the tensors it was traced with: before each ``Tensor.to(...)`` (and a
few other conversions) it calls ``aten._assert_tensor_metadata(x, dtype=..., device=...,
layout=...)``, which raises at run time when ``x`` differs, e.g. ``expected torch.float32, got
torch.bfloat16``. Under ``torch.autocast`` a linear before such a conversion returns bfloat16 and
the assertion stops the graph, although the conversion after it would give the traced dtype
again (HF models that upcast their logits with ``logits.float()`` hit this on the first step).

:func:`strip_dtype_assertions` erases exactly those nodes, in the graph module and in every
graph module nested in it (the bodies of higher-order ops such as
``wrap_with_set_grad_enabled``), so the graph can run under autocast. The distillation stages
call it on the student (and on a teacher that is a graph module) when
``DistillConfig.autocast == "bf16"``, before anything is extracted or compiled
(:mod:`dbllm_compile.distill.train`, used by both stages).

Invariants: only ``aten._assert_tensor_metadata`` nodes are removed (they return ``None`` and have
no users); every other node stays, including the shape assertions (``aten._assert_scalar``,
``sym_constrain_range_for_size``) and the dtype conversions themselves, so the graph computes
the same values with the same dtypes whenever the assertions would have passed. Every modified
graph is linted and its module recompiled.
"""

from __future__ import annotations

import torch
from torch import fx

from dbllm_compile.errors import GraphPassError

__all__ = ["is_dtype_assertion", "count_dtype_assertions", "strip_dtype_assertions"]

_ASSERT_TENSOR_METADATA = torch.ops.aten._assert_tensor_metadata


def is_dtype_assertion(node: fx.Node) -> bool:
    """True for a ``call_function`` of any overload of ``aten._assert_tensor_metadata``."""
    return node.op == "call_function" and (
        node.target is _ASSERT_TENSOR_METADATA
        or getattr(node.target, "overloadpacket", None) is _ASSERT_TENSOR_METADATA
    )


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and the graph modules nested in it, each once."""
    seen: set[int] = set()
    out: list[fx.GraphModule] = []
    for module in gm.modules():
        if isinstance(module, fx.GraphModule) and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def count_dtype_assertions(gm: fx.GraphModule) -> int:
    """Number of ``aten._assert_tensor_metadata`` nodes in ``gm`` and its nested graph modules."""
    return sum(is_dtype_assertion(n) for m in _graph_modules(gm) for n in m.graph.nodes)


def strip_dtype_assertions(gm: fx.GraphModule) -> int:
    """Erase every ``aten._assert_tensor_metadata`` node of ``gm`` and of the graph modules nested
    in it, in place; returns how many were erased (0: nothing changed, nothing recompiled).

    Raises:
        GraphPassError: an assertion node has users (it returns ``None``; the graph is malformed).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> class Up(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.m = m
        ...     def forward(self, x):
        ...         return self.m(x).float()
        >>> gm = torch.export.export(Up(), (torch.randn(2, 8),)).module()
        >>> strip_dtype_assertions(gm), count_dtype_assertions(gm)
        (1, 0)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     gm(torch.randn(2, 8)).dtype
        torch.float32
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"strip_dtype_assertions takes a torch.fx.GraphModule, got {type(gm).__name__}")
    removed = 0
    for module in _graph_modules(gm):
        nodes = [n for n in module.graph.nodes if is_dtype_assertion(n)]
        if not nodes:
            continue
        for node in nodes:
            if node.users:
                raise GraphPassError(
                    f"strip_dtype_assertions: node {node.name!r} ({node.target}) has users "
                    f"{[u.name for u in node.users]}; an assertion returns None, so the graph is malformed"
                )
            module.graph.erase_node(node)
        removed += len(nodes)
        module.graph.lint()
        module.recompile()
    return removed
