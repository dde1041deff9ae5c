"""Bring a graph captured by Dynamo into the form the linear passes read.

``torch.compile`` hands a backend a torch-level FX graph: linears are ``torch._C._nn.linear``
calls (``torch.matmul``, ``operator.matmul``, ``torch.addmm``, ``w.t()`` for the others) and,
with ``inline_inbuilt_nn_modules`` (the default since torch 2.5), parameters are graph inputs
(placeholders) bound to the real ``nn.Parameter`` objects in ``example_inputs``. The passes of
:mod:`~dbllm_compile.passes.linear_match` read ATen targets and ``get_attr`` parameters, as
``torch.export`` produces them. This module bridges the two, in place and reversibly:

- :func:`normalize_dynamo_graph`: torch-level linear-family calls become their ATen overloads
  (same semantics, callable in a torch-level graph), ``meta["val"]`` is filled from Dynamo's
  ``meta["example_value"]``, and every placeholder bound to an ``nn.Parameter`` is replaced by a
  ``get_attr`` of that same tensor registered on the graph module at its module path
  (``model.layers.0.self_attn.q_proj.weight``, taken from the Dynamo source). Nothing is copied.
- :func:`restore_parameter_inputs`: the inverse for the parameters the caller did not consume:
  their ``get_attr`` nodes read the placeholder again and the attributes are removed, so the
  compiled graph keeps its calling convention and reads live parameters.

Invariants: no node is removed from the calling convention (placeholders stay, possibly unused);
``meta["val"]`` entries added here are removed by :func:`restore_parameter_inputs`.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from dbllm_compile.errors import GraphPassError

__all__ = ["FrozenParameters", "normalize_dynamo_graph", "restore_parameter_inputs", "source_to_path"]

aten = torch.ops.aten

_LINEAR_FAMILY = {
    torch._C._nn.linear: aten.linear.default,
    torch.nn.functional.linear: aten.linear.default,
    torch.matmul: aten.matmul.default,
    operator.matmul: aten.matmul.default,
    torch.mm: aten.mm.default,
    torch.addmm: aten.addmm.default,
}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_PATH_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def source_to_path(source_name: str) -> str | None:
    """Module path of a Dynamo source name relative to the local it starts from (``L['self']``
    for ``torch.compile(model)``, ``L['model']`` for a compiled function taking the model), or
    None for globals and other sources.

    A module compiled directly can also be traced through its call wrapper, where it is the first
    positional argument (``L['args'][0]``, torch 2.13 with Hugging Face models): that index is
    part of the root, not of the path.

    Example:
        >>> source_to_path("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']")
        'model.layers.0.weight'
        >>> source_to_path("L['self'].lm_head.weight")
        'lm_head.weight'
        >>> source_to_path("L['args'][0]._modules['model']._modules['embed_tokens']._parameters['weight']")
        'model.embed_tokens.weight'
    """
    root = re.match(r"L\['args'\]\[\d+\]|L\['[A-Za-z_][A-Za-z0-9_]*'\]", source_name)
    if root is None:
        return None
    parts = [a or b or c for a, b, c in _PATH_PART.findall(source_name[root.end():])]
    return ".".join(parts) if parts else None


@dataclass
class FrozenParameters:
    """Parameters turned into ``get_attr`` nodes by :func:`normalize_dynamo_graph`.

    Attributes:
        placeholders: attribute target -> the placeholder node it replaced.
        added_val: nodes whose ``meta["val"]`` was filled in.
    """

    placeholders: dict[str, fx.Node] = field(default_factory=dict)
    added_val: list[fx.Node] = field(default_factory=list)


def _register(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner: torch.nn.Module = gm
    parts = target.split(".")
    for part in parts[:-1]:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise GraphPassError(
                    f"cannot name parameter {target!r} on the Dynamo graph module: {part!r} is already an "
                    f"attribute of it; report this graph (torch.compile backend 'dbllm')"
                )
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.register_parameter(parts[-1], value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False))


def _unique_target(gm: fx.GraphModule, wanted: str, taken: set[str]) -> str:
    target, i = wanted, 1
    while target in taken or _resolves(gm, target):
        target, i = f"{wanted}_{i}", i + 1
    taken.add(target)
    return target


def _resolves(gm: fx.GraphModule, target: str) -> bool:
    obj: object = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def normalize_dynamo_graph(gm: fx.GraphModule, example_inputs: list) -> FrozenParameters:
    """Normalise ``gm`` in place for the linear passes (see the module docstring)."""
    frozen = FrozenParameters()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    taken: set[str] = set()
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.nn.Parameter) or not node.users:
            continue
        grapharg = node.meta.get("grapharg")
        path = source_to_path(grapharg.source.name) if grapharg is not None else None
        target = _unique_target(gm, path or re.sub(r"\W", "_", node.name), taken)
        _register(gm, target, value)
        with gm.graph.inserting_after(node):
            getter = gm.graph.get_attr(target)
        getter.meta.update(node.meta)
        node.replace_all_uses_with(getter)
        frozen.placeholders[target] = node
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
            frozen.added_val.append(node)
        if node.op == "call_function" and node.target in _LINEAR_FAMILY:
            node.target = _LINEAR_FAMILY[node.target]
            if node.target == aten.linear.default and "bias" in node.kwargs:
                node.args = (*node.args, node.kwargs["bias"])
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        elif node.op == "call_method" and node.target in _TRANSPOSE_METHODS and _is_param(node.args[0]):
            _method_to_aten(node)
        elif node.op == "call_function" and node.target in (torch.t, torch.transpose, torch.permute) \
                and _is_param(node.args[0]):
            _method_to_aten(node, name=node.target.__name__)
    gm.graph.lint()
    return frozen


def _is_param(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _method_to_aten(node: fx.Node, name: str | None = None) -> None:
    name = name or node.target
    x, *rest = node.args
    node.op = "call_function"
    if name == "t":
        node.target, node.args = aten.t.default, (x,)
    elif name == "transpose":
        node.target, node.args = aten.transpose.int, (x, *rest)
    else:  # permute(*dims) or permute(dims)
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        node.target, node.args = aten.permute.default, (x, dims)


def restore_parameter_inputs(gm: fx.GraphModule, frozen: FrozenParameters) -> None:
    """Undo the freezing for every parameter still read through ``get_attr`` (see module doc)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in frozen.placeholders:
            node.replace_all_uses_with(frozen.placeholders[node.target])
            gm.graph.erase_node(node)
    for target in frozen.placeholders:
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
    for node in frozen.added_val:
        node.meta.pop("val", None)
    gm.graph.lint()
