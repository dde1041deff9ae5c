"""Fusions of ``dbllm::db_linear_gpu`` calls: siblings (``options["fuse_siblings"]``) and gated
MLPs (``options["fuse_glu"]``, :func:`fuse_glu_linears`, run first).

Linears that read the same activation (``q/k/v_proj`` on the attention input, ``gate/up_proj``
on the MLP input) become one ``db_linear_gpu`` on weights concatenated along the output
features, followed by one slice per original layer:

=============================================  ==============================================
before                                         after
=============================================  ==============================================
``y_i = db_linear_gpu(x, qw_i, sc_i, b_i,      ``y = db_linear_gpu(x, cat(qw), cat(sc), cat(b),
K, G)`` for i = 1..n                           K, G)``; ``y_i = y[..., o_i:o_i+N_i].contiguous()``
=============================================  ==============================================

The GPU layout stores every output row on its own (``qweight [N, K_alloc/16]``, ``scales
[N, K_alloc/G, 2]``), so concatenating along dim 0 gives exactly the rows of each layer: the
fused call computes the same numbers in one kernel launch, reading ``x`` once. ``.contiguous()``
gives each slice the strides of the output it replaces, so ``.view`` downstream keeps working.

Siblings: ``db_linear_gpu`` nodes on the same ``x`` node with the same ``in_features``,
``group_size``, scale dtype and device, whose ``qweight``/``scales`` are ``get_attr`` buffers
read by that node alone (shared buffers are left alone: fusing them would hold the weights
twice). Biases: all None (fused bias None), ``get_attr`` buffers (concatenated once, a zero
block for a layer without bias) or other nodes such as parameter placeholders (``torch.cat`` in
the graph, so live parameters keep being read); one bias dtype per group.

The fused node goes before the first sibling (``x`` dominates every sibling), each slice where
its sibling was. The old buffers are deleted from the graph module; the concatenated ones are
shared by every graph that fuses the same tensors (prefill, decode, recompilations), weakly
keyed by the tensors they were built from, as :mod:`.weights` shares the per-layer ones.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import fx

from dbllm_compile.ops import op_arguments
from dbllm_compile.passes.linear_match import get_attr_value
from dbllm_compile.tensor_cache import TensorCache

from .diagnostics import GraphRecord
from .lowering import _register_buffer

__all__ = ["fuse_sibling_linears", "fuse_glu_linears", "clear_fused_cache"]

_cache = TensorCache()


def clear_fused_cache() -> None:
    """Drop every cached concatenated weight (compiled graphs keep the ones they use)."""
    _cache.clear()


@torch.no_grad()
def _cat_rows(parts: Sequence[torch.Tensor | int], like: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` along dim 0 of ``parts`` (an int ``n``: ``n`` zero rows shaped like ``like``).

    Cached by the tensor parts, so graphs fusing the same layers share one copy.
    """
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    layout = (tuple(p if isinstance(p, int) else None for p in parts), like.dtype, like.device)
    value = _cache.get(tensors, layout)
    if value is None:
        value = _cache.put(tensors, torch.cat([like.new_zeros(p, *like.shape[1:]) if isinstance(p, int) else p
                                              for p in parts]), layout)
    return value


def _value(node: Any) -> Any:
    """The real tensor of a ``get_attr`` node, or the example value Dynamo recorded on a node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return get_attr_value(node.graph.owning_module, node.target)
    return node.meta.get("example_value", node.meta.get("val"))


def _own_buffer(node: Any, user: fx.Node, readers: dict[str, list[fx.Node]]) -> torch.Tensor | None:
    """The tensor behind ``node`` if it is a ``get_attr`` whose target only ``user`` reads."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    if any(set(r.users) - {user} for r in readers[node.target]):
        return None
    value = _value(node)
    return value if isinstance(value, torch.Tensor) else None


def _candidates(gm: fx.GraphModule, op: Any) -> list[list[tuple[fx.Node, dict[str, Any]]]]:
    """Sibling groups (graph order, at least two nodes each) of the fusable calls to ``op``."""
    groups: dict[tuple, list[tuple[fx.Node, dict[str, Any]]]] = defaultdict(list)
    readers: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target].append(node)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != op:
            continue
        args = op_arguments(node)
        x, k, g = args["x"], args["in_features"], args["group_size"]
        qweight, scales = (_own_buffer(args[a], node, readers) for a in ("qweight", "scales"))
        if not isinstance(x, fx.Node) or not isinstance(k, int) or not isinstance(g, int):
            continue
        if qweight is None or scales is None or qweight.dim() != 2 or scales.dim() != 3:
            continue
        if scales.shape[0] != qweight.shape[0]:
            continue
        key = (x, k, g, qweight.dtype, tuple(qweight.shape[1:]), scales.dtype, tuple(scales.shape[1:]),
               qweight.device)
        groups[key].append((node, args))
    return [g for g in groups.values() if len(g) >= 2]


def _fused_bias(gm: fx.GraphModule, group: list[tuple[fx.Node, dict[str, Any]]], rows: list[int],
                stem: str, first: fx.Node) -> tuple[bool, fx.Node | None]:
    """``(fusable, bias node of the fused call)``, inserted at the graph's current insert point.

    None for a group without biases; one concatenated buffer when every bias is a ``get_attr``;
    otherwise a ``torch.cat`` node over the bias nodes (zero buffers for missing biases).
    """
    biases = [args["bias"] for _, args in group]
    if all(b is None for b in biases):
        return True, None
    values = [_value(b) for b in biases]
    present = [v for b, v in zip(biases, values) if b is not None]
    if not all(isinstance(v, torch.Tensor) and tuple(v.shape) == (n,)
               for b, v, n in zip(biases, values, rows) if b is not None):
        return False, None
    if len({(v.dtype, v.device) for v in present}) != 1:
        return False, None
    like = present[0]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    movable = all(b is None or b.op in ("get_attr", "placeholder") or position[b] < position[first] for b in biases)
    if not movable:
        return False, None
    if all(b is None or b.op == "get_attr" for b in biases):
        value = _cat_rows([n if b is None else v for b, v, n in zip(biases, values, rows)], like)
        return True, gm.graph.get_attr(_register_buffer(gm, f"{stem}_bias", value))
    parts: list[fx.Node] = []
    for i, (b, n) in enumerate(zip(biases, rows)):
        if b is None:
            zeros = torch.zeros(n, dtype=like.dtype, device=like.device)  # ``like`` may be a fake tensor
            b = gm.graph.get_attr(_register_buffer(gm, f"{stem}_bias_zeros_{i}", zeros))
        elif b.op == "get_attr":  # read again here: the original may come after the first sibling
            b = gm.graph.get_attr(b.target)
        parts.append(b)
    return True, gm.graph.call_function(torch.cat, (parts,))


def _delete_buffer(gm: fx.GraphModule, target: str) -> None:
    """Remove an attribute no ``get_attr`` reads any more (and its Dynamo source entry)."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources.pop(target, None)


def _fused_call(gm: fx.GraphModule, op: Any, group: list[tuple[fx.Node, dict[str, Any]]], stem: str,
                before: fx.Node) -> fx.Node | None:
    """A call of ``op`` on the group's concatenated weights and biases, inserted before ``before``
    (which ``x`` and the group's bias nodes must dominate); None if the biases do not fuse."""
    args0 = group[0][1]
    qweights = [_value(a["qweight"]) for _, a in group]
    scales = [_value(a["scales"]) for _, a in group]
    rows = [int(q.shape[0]) for q in qweights]
    graph = gm.graph
    with graph.inserting_before(before):
        ok, bias = _fused_bias(gm, group, rows, stem, before)
        if not ok:
            return None
        q_node = graph.get_attr(_register_buffer(gm, f"{stem}_qweight", _cat_rows(qweights, qweights[0])))
        s_node = graph.get_attr(_register_buffer(gm, f"{stem}_scales", _cat_rows(scales, scales[0])))
        return graph.call_function(op, (args0["x"], q_node, s_node, bias, args0["in_features"],
                                        args0["group_size"]))


def _weight_attrs(args: dict[str, Any]) -> list[fx.Node]:
    return [a for a in (args["qweight"], args["scales"], args["bias"]) if isinstance(a, fx.Node) and a.op == "get_attr"]


def _drop_unread(gm: fx.GraphModule, attrs: list[fx.Node]) -> None:
    """Erase the ``get_attr`` nodes nothing reads any more, and their buffers."""
    for attr in dict.fromkeys(attrs):
        if not attr.users:
            target = attr.target
            gm.graph.erase_node(attr)
            _delete_buffer(gm, target)


def _fuse(gm: fx.GraphModule, op: Any, group: list[tuple[fx.Node, dict[str, Any]]], stem: str) -> bool:
    """Rewrite one sibling group (see the module docstring); False if its biases do not fuse."""
    fused = _fused_call(gm, op, group, stem, group[0][0])
    if fused is None:
        return False
    graph = gm.graph
    old_attrs: list[fx.Node] = []
    start = 0
    for node, args in group:
        n = int(_value(args["qweight"]).shape[0])
        with graph.inserting_before(node):
            piece = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, start + n))
            out = graph.call_method("contiguous", (piece,))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        old_attrs += _weight_attrs(args)
        graph.erase_node(node)
        start += n
    _drop_unread(gm, old_attrs)
    return True


def fuse_sibling_linears(gm: fx.GraphModule, record: GraphRecord) -> None:
    """Fuse sibling ``dbllm::db_linear_gpu`` calls of ``gm`` in place (see the module docstring).

    Counts ``record.lowered["db_linear_gpu:fused_groups"]`` (fused calls emitted) and
    ``record.lowered["db_linear_gpu:fused_linears"]`` (the calls they replace).
    """
    gpu_op = getattr(torch.ops.dbllm, "db_linear_gpu", None)
    if gpu_op is None:
        return
    index = 0
    for group in _candidates(gm, gpu_op.default):
        first_name = re.sub(r"[^0-9A-Za-z_]", "_", group[0][0].name)
        while hasattr(gm, f"_dbllm_fused_{index}_{first_name}_qweight"):  # a second run of the pass
            index += 1
        stem = f"_dbllm_fused_{index}_{first_name}"
        index += 1
        if _fuse(gm, gpu_op.default, group, stem):
            record.lowered["db_linear_gpu:fused_groups"] += 1
            record.lowered["db_linear_gpu:fused_linears"] += len(group)
    gm.graph.lint()


_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _gpu_call(node: Any, op: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == op


def _glu_match(mul: fx.Node, op: Any, readers: dict[str, list[fx.Node]]):
    """``(silu node, gate call, up call)`` if ``mul`` is ``silu(gate(x)) * up(x)`` (either order)
    on two ``op`` calls the rewrite may replace, else None.

    Replaceable: each intermediate read by the product only; same ``x``, ``in_features``,
    ``group_size``, scale dtype, row count and device; weights in ``get_attr`` buffers read by
    their call alone (as for sibling fusion).
    """
    if mul.op != "call_function" or mul.target not in _MUL or len(mul.args) != 2 or mul.kwargs:
        return None
    for act, up in (mul.args, mul.args[::-1]):
        if not (isinstance(act, fx.Node) and act.op == "call_function" and act.target in _SILU):
            continue
        if act.kwargs.get("inplace") or len(act.args) != 1 or not _gpu_call(act.args[0], op) or not _gpu_call(up, op):
            continue
        gate = act.args[0]
        if gate is up or len(gate.users) != 1 or len(act.users) != 1 or len(up.users) != 1:
            continue
        ga, ua = op_arguments(gate), op_arguments(up)
        if ga["x"] is not ua["x"] or not isinstance(ga["x"], fx.Node):
            continue
        if (ga["in_features"], ga["group_size"]) != (ua["in_features"], ua["group_size"]):
            continue
        weights = [(_own_buffer(a["qweight"], n, readers), _own_buffer(a["scales"], n, readers))
                   for n, a in ((gate, ga), (up, ua))]
        if any(q is None or s is None or q.dim() != 2 or s.dim() != 3 or s.shape[0] != q.shape[0] for q, s in weights):
            continue
        (gq, gs), (uq, us) = weights
        if (gq.shape, gq.dtype, gq.device, gs.shape, gs.dtype) != (uq.shape, uq.dtype, uq.device, us.shape, us.dtype):
            continue
        return act, (gate, ga), (up, ua)
    return None


def fuse_glu_linears(gm: fx.GraphModule, record: GraphRecord) -> None:
    """Rewrite ``silu(gate(x)) * up(x)`` on two ``dbllm::db_linear_gpu`` calls into one
    ``dbllm::db_glu_gpu`` call on the concatenated ``[gate; up]`` weights, in place
    (``options["fuse_glu"]``).

    At batch 1 the gemv then computes both products and the gate in its epilogue: one launch
    instead of a (sibling-fused) linear, two slices and Inductor's ``silu * up`` kernel
    (:mod:`dbllm_compile.backends.triton.prepared_op`). Run before :func:`fuse_sibling_linears`.
    Counts ``record.lowered["db_glu_gpu:fused"]`` (gated MLPs rewritten). Activations other than
    ``silu`` (GELU-gated MLPs) are not matched and stay two linears.
    """
    gpu_op = getattr(torch.ops.dbllm, "db_linear_gpu", None)
    glu_op = getattr(torch.ops.dbllm, "db_glu_gpu", None)
    if gpu_op is None or glu_op is None:
        return
    readers: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target].append(node)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    index = 0
    for mul in list(gm.graph.nodes):
        match = _glu_match(mul, gpu_op.default, readers)
        if match is None:
            continue
        act, (gate, ga), (up, ua) = match
        name = re.sub(r"[^0-9A-Za-z_]", "_", gate.name)
        while hasattr(gm, f"_dbllm_glu_{index}_{name}_qweight"):
            index += 1
        stem = f"_dbllm_glu_{index}_{name}"
        index += 1
        first = min(gate, up, key=lambda n: position[n])
        fused = _fused_call(gm, glu_op.default, [(gate, ga), (up, ua)], stem, first)
        if fused is None:
            continue
        fused.meta.update(mul.meta)
        mul.replace_all_uses_with(fused)
        for node in (mul, act, gate, up):
            gm.graph.erase_node(node)
        _drop_unread(gm, _weight_attrs(ga) + _weight_attrs(ua))
        record.lowered["db_glu_gpu:fused"] += 1
    gm.graph.lint()
