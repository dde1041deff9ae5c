"""Find the linear layers of an exported graph, whatever the architecture.

A *linear site* is a node that computes ``x @ W.T (+ b)`` with ``W`` a parameter:

==========================  =================================  =================
node                        weight operand                     layout of ``W``
==========================  =================================  =================
``aten.linear(x, W, b)``    ``W``                              ``nk`` [out, in]
``aten.linear(x, t(W))``    transposed parameter               ``kn``
``aten.matmul(x, W)``       ``W`` or ``t/transpose/permute(W)`` ``kn`` or ``nk``
``aten.mm(x, W)``           same                               same
``aten.addmm(b, x, W)``     same (GPT-2 ``Conv1D`` is ``kn``)  same
==========================  =================================  =================

Anything else that looks like one (weight computed by other ops, parameter on the left,
``addmm`` with ``alpha``/``beta``, a 2-D bias) is reported as skipped with the reason.
Products of two activations (attention scores) are not linears and are only counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["LinearSite", "SkippedSite", "find_linear_sites", "weight_owner_name", "get_attr_value"]

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_MATMULS = {aten.mm.default, aten.matmul.default, aten.addmm.default, aten.linear.default}


@dataclass
class LinearSite:
    """One linear node of the graph.

    Attributes:
        node: the FX node computing the product.
        kind: ``"linear"``, ``"matmul"``, ``"mm"`` or ``"addmm"``.
        x: the activation operand.
        weight_target: ``get_attr`` target of the weight parameter.
        layout: ``"nk"`` if the parameter is ``[out, in]``, ``"kn"`` if ``[in, out]``.
        bias: the bias operand, or None.
        name: the layer name used for include/exclude patterns: the module owning the weight.
    """

    node: fx.Node
    kind: str
    x: fx.Node
    weight_target: str
    layout: str
    bias: fx.Node | None
    name: str
    in_features: int
    out_features: int


@dataclass
class SkippedSite:
    """A linear-looking node or layer that was not rewritten, and why."""

    name: str
    node: str
    reason: str


def get_attr_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target refers to."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def weight_owner_name(target: str) -> str:
    """Layer name of a weight: its owning module's path, or the target itself at top level."""
    return target.rsplit(".", 1)[0] if "." in target else target


def _resolve_weight(node: fx.Node) -> tuple[fx.Node | None, bool, str | None]:
    """Follow at most one transpose from ``node`` to a ``get_attr``.

    Returns ``(get_attr node, transposed, why_not)``.
    """
    transposed = False
    cur = node
    if cur.op == "call_function" and cur.target in _TRANSPOSES:
        if cur.target == aten.permute.default and list(cur.args[1]) not in ([1, 0], [-1, -2]):
            return None, False, f"weight goes through {cur.name} (permute {cur.args[1]})"
        if cur.target == aten.transpose.int and sorted(int(d) % 2 for d in cur.args[1:3]) != [0, 1]:
            return None, False, f"weight goes through {cur.name} (transpose {cur.args[1:3]})"
        transposed = True
        cur = cur.args[0]
    if not isinstance(cur, fx.Node):
        return None, False, "weight is a constant"
    if cur.op == "get_attr":
        return cur, transposed, None
    if cur.op == "placeholder":
        return None, False, f"weight is the graph input {cur.name!r}, not a parameter"
    return None, False, f"weight is computed by node {cur.name!r} ({cur.target}), not a parameter"


def _is_param_like(node: fx.Node) -> bool:
    base = node.args[0] if node.op == "call_function" and node.target in _TRANSPOSES else node
    return isinstance(base, fx.Node) and base.op == "get_attr"


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a graph input (activations), as opposed to parameters only."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _derived_from_param(node: fx.Node) -> bool:
    """Whether ``node`` is computed from some ``get_attr`` (a computed weight, not an activation)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return True
        stack.extend(n.all_input_nodes)
    return False


def find_linear_sites(gm: fx.GraphModule) -> tuple[list[LinearSite], list[SkippedSite], int]:
    """All linear sites of ``gm`` in graph order, the skipped look-alikes, and the number of
    activation-by-activation products.

    Example:
        >>> from dbllm_compile.passes.export import export_model
        >>> ep, _ = export_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(2, 8),))
        >>> sites, skipped, n_act = find_linear_sites(ep.module())
        >>> [(s.name, s.layout, s.in_features, s.out_features) for s in sites]
        [('0', 'nk', 8, 4)]
    """
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    sites: list[LinearSite] = []
    skipped: list[SkippedSite] = []
    activation_products = 0
    input_dependent = _input_dependent(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        kind = str(node.target).split(".")[-2]
        if node.target == aten.addmm.default:
            bias, x, w = node.args[0], node.args[1], node.args[2]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                skipped.append(SkippedSite(node.name, node.name, "addmm with alpha/beta != 1"))
                continue
        elif node.target == aten.linear.default:
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        else:
            x, w = node.args[0], node.args[1]
            bias = None
        if not _is_param_like(w):
            if _is_param_like(x):
                skipped.append(
                    SkippedSite(node.name, node.name, "the parameter is the left operand (W @ x); only x @ W is a linear")
                )
            elif isinstance(w, fx.Node) and w not in input_dependent and _derived_from_param(w):
                _, _, why = _resolve_weight(w)
                skipped.append(SkippedSite(node.name, node.name, why or "weight is computed from a parameter"))
            else:
                activation_products += 1
            continue
        attr, transposed, why = _resolve_weight(w)
        if attr is None:
            skipped.append(SkippedSite(node.name, node.name, why or "unsupported weight"))
            continue
        name = weight_owner_name(attr.target)
        if attr.target not in params:
            skipped.append(SkippedSite(name, node.name, f"{attr.target!r} is a buffer or constant, not a parameter"))
            continue
        value = get_attr_value(gm, attr.target)
        if value.dim() != 2:
            skipped.append(SkippedSite(name, node.name, f"weight {attr.target!r} has shape {tuple(value.shape)}, not 2-D"))
            continue
        # aten.linear takes W as [out, in]; the matmul family takes the right operand as [in, out].
        nk = (not transposed) if node.target == aten.linear.default else transposed
        out_f, in_f = value.shape if nk else value.shape[::-1]
        if bias is not None:
            bval = bias.meta.get("val") if isinstance(bias, fx.Node) else None
            if bval is None or tuple(bval.shape) != (out_f,):
                skipped.append(SkippedSite(name, node.name, f"bias of shape {None if bval is None else tuple(bval.shape)} is not [{out_f}]"))
                continue
        xval = x.meta.get("val") if isinstance(x, fx.Node) else None
        if xval is None or xval.dim() < 1:
            skipped.append(SkippedSite(name, node.name, "activation operand has no shape metadata"))
            continue
        sites.append(
            LinearSite(node, kind, x, attr.target, "nk" if nk else "kn", bias, name, int(in_f), int(out_f))
        )
    return sites, skipped, activation_products
