"""Graph analyses on the exported data-flow graph, with networkx.

- :func:`dataflow_graph`: the FX graph as a ``networkx.DiGraph`` (edges producer -> consumer).
- :func:`find_heads`: linears from which no other linear is reachable (output heads).
- :func:`sibling_groups`: linears that consume the same activation (q/k/v, gate/up), looking
  through view-like ops; a later pass quantizes such an activation once.
- :func:`find_blocks`: repeated blocks (transformer layers): the linears grouped by the
  innermost indexed container in their module path (``model.layers.3``), with the block's
  nodes, its input activations and its outputs on the data-flow graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from dbllm_compile.passes.linear_match import LinearSite

__all__ = ["Block", "dataflow_graph", "find_blocks", "find_heads", "sibling_groups", "block_name"]

aten = torch.ops.aten

_VIEW_LIKE = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.dropout.default,
}


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Nodes are FX node names; an edge ``a -> b`` means ``b`` reads ``a``."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def find_heads(graph: nx.DiGraph, sites: list[LinearSite]) -> set[str]:
    """Names of the linear nodes that reach the graph output with no other linear on the way.

    One pass in reverse topological order: a node "feeds a linear" if any successor is a
    linear or feeds one, and "reaches the output" if a successor is the output node or reaches
    it. A linear whose value only feeds a mutation (the key/value projections writing a KV
    cache in a Dynamo graph) reaches no output and is not a head.
    """
    linear_nodes = {s.node.name for s in sites}
    feeds: dict[str, bool] = {}
    reaches: dict[str, bool] = {}
    for name in reversed(list(nx.topological_sort(graph))):
        succ = list(graph.successors(name))
        feeds[name] = any(s in linear_nodes or feeds[s] for s in succ)
        reaches[name] = graph.nodes[name].get("op") == "output" or any(reaches[s] for s in succ)
    return {n for n in linear_nodes if not feeds[n] and reaches[n]}


def _through_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _VIEW_LIKE and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def sibling_groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Groups (size >= 2) of linears that read the same activation, in graph order."""
    groups: dict[str, list[LinearSite]] = {}
    for site in sites:
        groups.setdefault(_through_views(site.x).name, []).append(site)
    return [g for g in groups.values() if len(g) > 1]




def block_name(layer_name: str) -> str:
    """The innermost indexed container of a layer path, or the path itself.

    Example:
        >>> block_name("model.layers.3.self_attn.q_proj")
        'model.layers.3'
        >>> block_name("transformer.h.0.attn.c_attn")
        'transformer.h.0'
        >>> block_name("fc1")
        'fc1'
    """
    parts = layer_name.split(".")
    last = None
    for i, part in enumerate(parts):
        if part.isdigit():
            last = i
    return ".".join(parts[: last + 1]) if last is not None else layer_name


@dataclass
class Block:
    """A repeated unit of the model (e.g. one transformer layer).

    Attributes:
        name: module path of the block (``model.layers.3``).
        linears: layer names of its linears, in graph order.
        nodes: FX node names computed inside the block, in graph order.
        inputs: activation nodes from outside the block that it reads.
        outputs: block nodes read from outside the block (or returned).
    """

    name: str
    linears: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _module_paths(node: fx.Node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {path for path, _ in stack.values()}


def find_blocks(gm: fx.GraphModule, layer_names: list[str], graph: nx.DiGraph | None = None) -> list[Block]:
    """Blocks of the model in graph order, each with its nodes and boundary on the data flow.

    ``layer_names`` are the layers to group (usually the quantized ones).

    A node belongs to a block if the block's path is in its ``nn_module_stack``. Inputs are the
    non-parameter nodes outside the block that block nodes read; outputs are block nodes read
    outside it.
    """
    graph = graph if graph is not None else dataflow_graph(gm)
    blocks: dict[str, Block] = {}
    for layer in layer_names:
        name = block_name(layer)
        blocks.setdefault(name, Block(name)).linears.append(layer)
    member: dict[str, str] = {}
    for node in gm.graph.nodes:
        paths = _module_paths(node)
        for name in blocks:
            if name in paths:
                member[node.name] = name
                blocks[name].nodes.append(node.name)
                break
    kinds = {node.name: node.op for node in gm.graph.nodes}
    for block in blocks.values():
        inside = set(block.nodes)
        ins: list[str] = []
        outs: list[str] = []
        for n in block.nodes:
            for p in graph.predecessors(n):
                if p not in inside and kinds[p] not in ("get_attr",) and p not in ins:
                    ins.append(p)
            if any(s not in inside for s in graph.successors(n)):
                outs.append(n)
        block.inputs, block.outputs = ins, outs
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(blocks.values(), key=lambda b: order.get(b.nodes[0], 0) if b.nodes else 0)
