"""Transformer blocks as standalone modules, and the teacher's values at their boundaries.

The blocks come from the exported graph (:func:`dbllm_compile.passes.graph_analysis.find_blocks`,
stored in ``PassReport.blocks``), so nothing here knows any architecture:

- :func:`extract_block` copies a block's nodes into a ``GraphModule`` whose placeholders are the
  block's inputs (hidden states, rotary tables, masks, symbolic sizes) and whose outputs are its
  outputs. Its ``get_attr`` targets resolve to the *same* tensors as the student's, so training
  the block trains the student.
- :func:`capture` runs the student graph with every dual-binary op replaced by the dense linear of
  its latent weight (the full-precision teacher, as long as the latent weights are untouched)
  and records chosen node values.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx._pytree import tree_flatten_spec

from dbllm_compile.errors import GraphPassError
from dbllm_compile.ops import ACT_QUANT_TRAIN_OP, TRAIN_OP
from dbllm_compile.passes.graph_analysis import Block

__all__ = ["extract_block", "capture", "flat_inputs"]


def extract_block(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A ``GraphModule`` computing ``block``: ``forward(*inputs) -> tuple(outputs)``.

    Inputs and outputs are in the order of ``block.inputs`` / ``block.outputs``.

    Raises:
        GraphPassError: a block node reads a value that is neither a block input, a block
            node nor a parameter (the block boundary from the analysis is inconsistent).
    """
    inside = set(block.nodes)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in block.inputs:
        env[name] = graph.placeholder(name)

    def lookup(node: fx.Node) -> fx.Node:
        if node.name in env:
            return env[node.name]
        if node.op == "get_attr":
            env[node.name] = graph.get_attr(node.target)
            return env[node.name]
        raise GraphPassError(
            f"block {block.name!r}: node {node.name!r} reads {node.name!r} from outside the block, "
            "which is not one of its inputs; the block boundary is inconsistent (please report)"
        )

    for node in gm.graph.nodes:
        if node.name in inside:
            env[node.name] = graph.node_copy(node, lookup)
    missing = [o for o in block.outputs if o not in env]
    if missing:
        raise GraphPassError(f"block {block.name!r}: outputs {missing} are not block nodes")
    graph.output(tuple(env[o] for o in block.outputs))
    graph.eliminate_dead_code()
    module = fx.GraphModule(gm, graph, class_name=f"Block_{block.name.replace('.', '_')}")
    return module


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """Flatten a call's ``(args, kwargs)`` into the exported graph's placeholder order."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args)
    return list(tree_flatten_spec((args, kwargs), spec))


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str], dense: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.dense = dense
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.dense and n.op == "call_function" and n.target == TRAIN_OP:
            x, weight, _a1, _a2, bias = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:5])
            out = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        elif self.dense and n.op == "call_function" and n.target == ACT_QUANT_TRAIN_OP:
            out = self.env[n.args[0]]  # full precision: activations are not quantized
        else:
            out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


@torch.no_grad()
def capture(
    gm: fx.GraphModule,
    args: tuple,
    kwargs: dict[str, Any],
    names: Iterable[str],
    *,
    dense: bool = True,
) -> dict[str, Any]:
    """Values of the nodes ``names`` when ``gm`` runs on ``(args, kwargs)``.

    With ``dense=True`` each ``db_linear_train`` computes ``x @ W.T + b`` from its latent weight
    ``W`` and each ``act_quant_train`` passes its input through: the full-precision model, before
    any latent weight has been trained.
    """
    runner = _Capture(gm, set(names), dense)
    runner.run(*flat_inputs(gm, args, kwargs))
    return runner.values
