"""Insert 4-bit activation quantizers before the dual-binary linears (``activation_bits=4``).

Runs after :func:`~dbllm_compile.passes.quantize_linears.quantize_linears` has rewritten the
linears into ``dbllm.db_linear_train`` nodes. The inputs of those nodes are grouped by the
activation they read, looking through view-like ops exactly as
:func:`~dbllm_compile.passes.graph_analysis.sibling_groups` does (q/k/v read one normed hidden
state, gate/up another). Each group gets:

- ONE float32 parameter ``<first layer's weight>_act_clip`` (shape ``[]``), the clip logit
  ``theta`` initialised to ``logit(DEFAULT_CLIP_RATIO)``;
- ONE ``dbllm.act_quant_train(root, clip, G)`` node placed right after the shared activation
  ``root``; every linear of the group reads it (through a copy of its own view chain when it
  read a view of ``root``). A linear without siblings gets its own quantizer. ``G`` is
  ``DBLLMConfig.activation_group_size`` (0: one scale per token, written as the two-argument
  call of the graphs from before the argument existed; ``G > 0``: one scale per token and
  group of ``G`` contiguous input features, which must divide every quantized activation's
  ``K``: otherwise a :class:`~dbllm_compile.errors.ConfigError` names the layer and the fix
  before anything is inserted).

Per-token (and per-group) quantization commutes with a view only if the view keeps the last
(feature) dimension; a linear whose input is a view that changes it is given its own quantizer
on its direct input instead.

Invariants: ``node.meta["val"]`` of an inserted node is the (fake) value of its input (same
shape and dtype); no node is mutated in place and no aliasing is introduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from dbllm_compile.errors import ConfigError
from dbllm_compile.ops import ACT_QUANT_TRAIN_OP, TRAIN_OP
from dbllm_compile.passes.graph_analysis import _through_views
from dbllm_compile.reference.activation import DEFAULT_CLIP_RATIO, clip_logit_from_ratio

__all__ = [
    "ActivationQuantizer",
    "check_activation_group_size",
    "insert_activation_quant",
    "insert_after",
    "quantized_inputs",
    "rewire",
]


@dataclass
class ActivationQuantizer:
    """One inserted quantizer: its node, clip parameter, the activation it quantizes, and readers.

    Attributes:
        node: name of the ``act_quant_train`` node.
        clip: ``get_attr`` target of the clip logit parameter.
        input: name of the quantized activation node.
        layers: weight targets of the linears reading it (2+ for siblings such as q/k/v).
        group_size: activation scale granularity (0: per token; ``G``: per token and group of
            ``G`` input features).
        in_features: ``K``, the feature dimension of the quantized activation.
    """

    node: str
    clip: str
    input: str
    layers: list[str] = field(default_factory=list)
    group_size: int = 0
    in_features: int = 0


def _view_chain(x: fx.Node, root: fx.Node) -> list[fx.Node]:
    """The view nodes from ``root`` (exclusive) to ``x`` (inclusive), in execution order."""
    chain = []
    while x is not root:
        chain.append(x)
        x = x.args[0]
    return chain[::-1]


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _register_clip(gm: fx.GraphModule, target: str, device: torch.device) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    theta = torch.tensor(clip_logit_from_ratio(DEFAULT_CLIP_RATIO), dtype=torch.float32, device=device)
    owner.register_parameter(attr, torch.nn.Parameter(theta))


def insert_after(gm: fx.GraphModule, source: fx.Node, make) -> fx.Node:
    """Insert the node ``make()`` builds right after ``source`` (after the last placeholder when
    ``source`` is one), with ``source``'s value and module-stack meta (shape- and dtype-preserving
    ops only: activation quantizers, rotations)."""
    anchor = source
    if source.op == "placeholder":  # keep all placeholders first
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        new = make()
    if "val" in source.meta:
        new.meta["val"] = source.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):
        if key in source.meta:
            new.meta[key] = source.meta[key]
    return new


def _insert_quantizer(gm: fx.GraphModule, source: fx.Node, clip_target: str, group_size: int) -> fx.Node:
    def make() -> fx.Node:
        clip_node = gm.graph.get_attr(clip_target)
        with gm.graph.inserting_after(clip_node):
            args = (source, clip_node) if group_size == 0 else (source, clip_node, group_size)
            return gm.graph.call_function(ACT_QUANT_TRAIN_OP, args)

    return insert_after(gm, source, make)


def rewire(gm: fx.GraphModule, linear: fx.Node, root: fx.Node, quantized: fx.Node) -> None:
    """Make ``linear`` read ``quantized`` in place of ``root`` (copying its view chain)."""
    x = linear.args[0]
    env = {root: quantized}
    new_x = quantized
    for view in _view_chain(x, root):
        with gm.graph.inserting_before(linear):
            new_x = gm.graph.node_copy(view, lambda n: env.get(n, n))
        env[view] = new_x
    linear.args = (new_x, *linear.args[1:])
    while x is not root and not x.users:  # the old view chain, if nothing else reads it
        parent = x.args[0]
        gm.graph.erase_node(x)
        x = parent


def quantized_inputs(gm: fx.GraphModule) -> dict[fx.Node, tuple[list[fx.Node], int]]:
    """``{root: (readers, K)}``: the activations to quantize, their linears and feature dimension."""
    groups: dict[fx.Node, tuple[list[fx.Node], int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != TRAIN_OP:
            continue
        x = node.args[0]
        root = _through_views(x)
        k = gm.get_parameter(node.args[1].target).shape[1]  # latent weight [N, K]
        if root is not x and _last_dim(root) not in (None, k):
            root = x  # the view changes the feature dimension: quantize this input on its own
        groups.setdefault(root, ([], int(k)))[0].append(node)
    return groups


def check_activation_group_size(gm: fx.GraphModule, group_size: int) -> None:
    """Raise a :class:`~dbllm_compile.errors.ConfigError` unless ``group_size`` (``>= 0``) divides
    the feature dimension of every activation :func:`insert_activation_quant` would quantize in
    ``gm`` (a graph with training-form linears). ``0`` (per token) always fits."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ConfigError(f"activation group size must be an int >= 0 (0 = one scale per token), got {group_size!r}")
    if group_size == 0:
        return
    bad = [(readers, k) for readers, k in quantized_inputs(gm).values() if k % group_size]
    if bad:
        readers, k = bad[0]
        layers = ", ".join(n.args[1].target.removesuffix(".weight") for n in readers)
        ks = sorted({k for _, k in bad})
        raise ConfigError(
            f"activation group size {group_size} does not divide the input features K={k} of {layers} "
            f"(node {readers[0].name}; {len(bad)} quantized activation(s) in all, K in {ks}): choose an "
            f"activation group size (DBLLMConfig.activation_group_size, --act-group-size) that divides "
            f"every K, or 0 for one scale per token"
        )


def insert_activation_quant(gm: fx.GraphModule, group_size: int = 0) -> list[ActivationQuantizer]:
    """Insert one ``act_quant_train`` per distinct input of the training-form linears of ``gm``.

    ``group_size``: 0 for one activation scale per token, ``G > 0`` for one per token and group
    of ``G`` input features (must divide every quantized ``K``; checked first, nothing is
    inserted otherwise). Returns the quantizers in graph order. The graph is linted and
    recompiled by the caller.

    Example:
        >>> from dbllm_compile.passes.export import export_model
        >>> from dbllm_compile.passes.quantize_linears import quantize_linears
        >>> from dbllm_compile.config import DBLLMConfig
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> gm = export_model(m, (torch.randn(2, 64),))[0].module()
        >>> r = quantize_linears(gm, DBLLMConfig(activation_bits=4, keep_head=False))
        >>> [q.layers for q in r.activation_quantizers]
        [['0.weight'], ['2.weight']]
    """
    check_activation_group_size(gm, group_size)
    quantizers = []
    for root, (readers, k) in quantized_inputs(gm).items():
        first_weight = readers[0].args[1].target
        clip_target = f"{first_weight}_act_clip"
        device = gm.get_parameter(first_weight).device
        _register_clip(gm, clip_target, device)
        quantized = _insert_quantizer(gm, root, clip_target, group_size)
        for linear in readers:
            rewire(gm, linear, root, quantized)
        quantizers.append(
            ActivationQuantizer(quantized.name, clip_target, root.name, [n.args[1].target for n in readers],
                                group_size=group_size, in_features=k)
        )
    return quantizers
