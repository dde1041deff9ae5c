"""Rewrite the training op into the packed deploy op (the convert step).

For each ``dbllm.db_linear_train`` node: the scales are rounded to ``scale_dtype`` and stored
as buffers, the bits are assigned from the latent weight exactly as the training op's forward
does and packed (:mod:`dbllm_compile.reference.packing`), and the node becomes
``dbllm.db_linear(x, packed, a1, a2, bias, in_features, group_size)``. A node of the sign
codebook (its last argument is the offset ``c``) keeps it: ``c`` is rounded and stored like the
scales (``<weight>_c_<dtype>``), the bits are those of ``w - c`` (the sign-form bits), and the
deploy node gets ``c`` as its last argument. Latent weights and float32 scales are removed
afterwards, so the deployed module holds 2 bits per weight plus the scales (and offsets). The
training and deploy forms then compute bit-identical outputs.

Each ``dbllm.act_quant_train(x, clip_logit[, group_size])`` node (``activation_bits=4``) becomes
``dbllm.act_quant(x, clip_ratio[, group_size])`` with the float32 buffer
``<clip>_ratio = sigmoid(clip_logit)`` (the value the training form computes, so both forms
quantize identically) and the same activation group size (omitted when 0, per token); the logit
is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import fx

from dbllm_compile.ops import ACT_QUANT_OP, ACT_QUANT_TRAIN_OP, DEPLOY_OP, TRAIN_OP, op_arguments
from dbllm_compile.reference.activation import clip_ratio_from_logit
from dbllm_compile.reference.linear import train_weight_reference
from dbllm_compile.reference.packing import pack_planes
from dbllm_compile.passes.linear_match import get_attr_value
from dbllm_compile.passes.quantize_linears import _set_attr, erase_if_dead, replace_node

__all__ = ["PackedLayer", "pack_linears"]


@dataclass
class PackedLayer:
    """A layer in deploy form and its storage."""

    weight: str
    out_features: int
    in_features: int
    packed_bytes: int
    scale_bytes: int


def _remove_attr(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def _convert_activation_quant(gm: fx.GraphModule) -> set[str]:
    """``act_quant_train`` -> ``act_quant`` with a stored ratio; returns the logit targets."""
    logits: set[str] = set()
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == ACT_QUANT_TRAIN_OP]:
        a = op_arguments(node)
        x, clip_node, group_size = a["x"], a["clip_logit"], a["group_size"]
        ratio_target = f"{clip_node.target}_ratio"
        ratio = clip_ratio_from_logit(get_attr_value(gm, clip_node.target).detach())
        _set_attr(gm, ratio_target, ratio, parameter=False)
        with gm.graph.inserting_before(node):
            ratio_node = gm.graph.get_attr(ratio_target)
            args = (x, ratio_node) if not group_size else (x, ratio_node, group_size)
            new = gm.graph.call_function(ACT_QUANT_OP, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        erase_if_dead(gm, clip_node)
        logits.add(clip_node.target)
    return logits


@torch.no_grad()
def pack_linears(
    gm: fx.GraphModule,
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
    structure_only: bool = False,
) -> list[PackedLayer]:
    """Convert every training-form node of ``gm`` in place; returns what was packed.

    With ``structure_only=True`` no bit is computed: the packed planes ``uint8 [2, N, K_pad/8]``
    and the scales (and offsets) ``[N, ceil(K/G)]`` are zeros of the right shapes and dtypes, on
    the latent weight's device (placeholders for tensors loaded from an artifact afterwards).
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == TRAIN_OP]
    training_attrs: set[str] = set()
    done: dict[str, tuple[list[str], PackedLayer]] = {}
    iterator: Iterable = nodes if progress is None else progress(nodes)
    for node in iterator:
        a = op_arguments(node)
        group_size, scale_dtype, c_node = a["group_size"], a["scale_dtype"], a["c"]
        target = a["weight"].target
        training_attrs.update(n.target for n in (a["weight"], a["a1"], a["a2"], c_node) if n is not None)
        if target not in done:
            weight = get_attr_value(gm, target)
            a1 = get_attr_value(gm, a["a1"].target)
            a2 = get_attr_value(gm, a["a2"].target)
            c = None if c_node is None else get_attr_value(gm, c_node.target)
            if structure_only:
                k_pad = a1.shape[1] * group_size
                packed = torch.zeros((2, weight.shape[0], k_pad // 8), dtype=torch.uint8, device=weight.device)
            else:
                _, b1, b2 = train_weight_reference(weight, a1, a2, group_size, scale_dtype, c)
                packed = pack_planes(b1, b2)
            suffix = str(scale_dtype).split(".")[-1]
            stored = {f"{target}_packed": packed, f"{target}_a1_{suffix}": a1.detach().to(scale_dtype),
                      f"{target}_a2_{suffix}": a2.detach().to(scale_dtype)}
            if c is not None:
                stored[f"{target}_c_{suffix}"] = c.detach().to(scale_dtype)
            for name, value in stored.items():
                _set_attr(gm, name, value, parameter=False)
            layer = PackedLayer(
                weight=target,
                out_features=weight.shape[0],
                in_features=weight.shape[1],
                packed_bytes=packed.numel(),
                scale_bytes=sum(t.numel() * t.element_size() for t in list(stored.values())[1:]),
            )
            done[target] = (list(stored), layer)
        names, layer = done[target]
        with gm.graph.inserting_before(node):
            packed_n, a1_n, a2_n, *c_n = (gm.graph.get_attr(t) for t in names)
            new = gm.graph.call_function(
                DEPLOY_OP, (a["x"], packed_n, a1_n, a2_n, a["bias"], layer.in_features, group_size, *c_n)
            )
        replace_node(gm, node, new)
    training_attrs |= _convert_activation_quant(gm)
    # Drop latent weights, float32 scales and clip logits no node reads any more.
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in training_attrs - still_read:
        _remove_attr(gm, target)
    gm.graph.lint()
    gm.recompile()
    return [v[1] for v in done.values()]
