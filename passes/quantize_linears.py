"""Rewrite linear sites into the training form of the dual-binary op.

For every selected layer (a weight parameter and all linear sites that use it):

- the weight is cloned into a latent ``[out, in]`` parameter at the same attribute (a ``kn``
  weight such as GPT-2's ``Conv1D`` is stored transposed), so the caller's model is never
  modified;
- two float32 parameters ``<weight>_a1`` and ``<weight>_a2`` of shape ``[out, ceil(in/G)]``
  are registered next to it, initialised by :func:`dbllm_compile.reference.init_scales`;
- with ``codebook="sign"``, a third float32 parameter ``<weight>_c`` (same shape, the per-group
  offset), and all three are initialised by
  :func:`dbllm_compile.reference.sign_codebook.init_sign_scales` instead;
- each site becomes ``dbllm.db_linear_train(x, weight, a1, a2, bias, G, scale_dtype)``, with
  ``c`` appended as the last argument for the sign codebook;
- with ``rotation_block=B``, the latent weight is ``W @ Q`` (block-diagonal Hadamard, rotated
  before the initialisation) and one ``dbllm.hadamard`` per distinct input is inserted before
  the linears, see :mod:`dbllm_compile.passes.rotation`;
- with ``activation_bits=4``, one ``dbllm.act_quant_train`` per distinct input is inserted
  before the linears (shared by siblings such as q/k/v), see
  :mod:`dbllm_compile.passes.activation_quant`.

Selection: include/exclude patterns on the layer name, heads kept in full precision when
``keep_head``; a weight that is also read by anything other than a linear site (e.g. an
embedding tied to the head) is skipped, because quantizing it would change the other reader.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx

from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ConfigError
from dbllm_compile.ops import TRAIN_OP
from dbllm_compile.reference.dual_binary import check_weight, init_scales, padded_in_features
from dbllm_compile.reference.rotation import rotate_weight
from dbllm_compile.reference.sign_codebook import init_sign_scales
from dbllm_compile.passes.graph_analysis import (
    Block,
    dataflow_graph,
    find_blocks,
    find_heads,
    sibling_groups,
)
from dbllm_compile.passes.linear_match import (
    LinearSite,
    SkippedSite,
    find_linear_sites,
    get_attr_value,
)

__all__ = ["QuantizedLayer", "PassReport", "quantize_linears", "select_linears", "matches_any", "erase_if_dead"]


@dataclass
class QuantizedLayer:
    """A layer the pass rewrote."""

    name: str
    weight: str
    nodes: list[str]
    kind: str
    layout: str
    in_features: int
    out_features: int
    padded_in_features: int
    init_mse: float
    mirrored_fraction: float  # NaN for the sign codebook (it has no mirrored grid)


@dataclass
class PassReport:
    """What the pass did: rewritten layers, skipped sites with reasons, and graph facts."""

    rewritten: list[QuantizedLayer] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    activation_products: int = 0
    sibling_groups: list[list[str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    activation_quantizers: list[Any] = field(default_factory=list)
    rotations: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable multi-line summary."""
        lines = [
            f"rewrote {len(self.rewritten)} linear layer(s) into dual-binary ops; "
            f"skipped {len(self.skipped)}; {self.activation_products} activation x activation "
            f"product(s) left alone; {len(self.blocks)} block(s); "
            f"{len(self.sibling_groups)} group(s) of linears sharing an input"
        ]
        if self.rotations:
            lines.append(f"  {len(self.rotations)} Hadamard input rotation(s) of block {self.rotations[0].block}")
        if self.activation_quantizers:
            shared = sum(len(q.layers) > 1 for q in self.activation_quantizers)
            lines.append(
                f"  {len(self.activation_quantizers)} 4-bit activation quantizer(s), {shared} shared "
                f"by sibling linears"
            )
        reasons: dict[str, list[str]] = {}
        for s in self.skipped:
            reasons.setdefault(s.reason, []).append(s.name)
        for reason, names in reasons.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"  skipped {shown}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "rewritten": [vars(q) for q in self.rewritten],
            "skipped": [vars(s) for s in self.skipped],
            "activation_products": self.activation_products,
            "sibling_groups": self.sibling_groups,
            "blocks": [vars(b) for b in self.blocks],
            "activation_quantizers": [vars(q) for q in self.activation_quantizers],
            "rotations": [vars(r) for r in self.rotations],
            "notes": self.notes,
        }


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` matches a glob, or a ``re:<regex>`` pattern (``re.fullmatch``)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, *, parameter: bool) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)
    if parameter:
        owner.register_parameter(attr, torch.nn.Parameter(value))
    else:
        owner.register_buffer(attr, value)


def _aliases(gm: fx.GraphModule, target: str) -> list[str]:
    """Every parameter name that refers to the same tensor as ``target`` (tied weights)."""
    tensor = get_attr_value(gm, target)
    return [n for n, p in gm.named_parameters(remove_duplicate=False) if p is tensor]


def erase_if_dead(gm: fx.GraphModule, node: object) -> None:
    """Erase ``node`` and, recursively, its inputs once they have no users left.

    Only nodes made dead by a rewrite are touched; the rest of the graph (including impure
    nodes such as export's input guards) is left alone.
    """
    if not isinstance(node, fx.Node) or node.users or node.op in ("placeholder", "output"):
        return
    inputs = list(node.all_input_nodes)
    gm.graph.erase_node(node)
    for inp in inputs:
        erase_if_dead(gm, inp)


def replace_node(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """Put ``new`` in ``node``'s place: copy its meta, move its users, erase it and the inputs it
    leaves dead (the one way every rewrite pass swaps a linear for a dual-binary op)."""
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    inputs = list(node.all_input_nodes)
    gm.graph.erase_node(node)
    for inp in inputs:
        erase_if_dead(gm, inp)


def _consumers(node: fx.Node, transposes: set) -> list[fx.Node]:
    """Readers of a weight, looking through one transpose."""
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target in transposes:
            out.extend(user.users)
        else:
            out.append(user)
    return out


def select_linears(gm: fx.GraphModule, config: DBLLMConfig) -> tuple[PassReport, list[tuple[str, list[LinearSite]]]]:
    """The layers of ``gm`` that ``config`` selects, as ``(weight target, sites)``, in graph order,
    and a report holding the skipped sites with their reasons (nothing is rewritten).

    Selection: include/exclude patterns on the layer name, heads kept when ``keep_head``, weights
    also read by anything other than their linear sites (tied embeddings) and weights used in both
    layouts skipped.
    """
    from dbllm_compile.passes.linear_match import _TRANSPOSES

    report = PassReport()
    sites, skipped, report.activation_products = find_linear_sites(gm)
    report.skipped.extend(skipped)
    graph = dataflow_graph(gm)
    heads = find_heads(graph, sites) if config.keep_head else set()
    report.sibling_groups = [[s.name for s in g] for g in sibling_groups(sites)]

    by_weight: dict[str, list[LinearSite]] = {}
    for site in sites:
        if site.node.name in heads:
            report.skipped.append(SkippedSite(site.name, site.node.name, "output head kept in full precision (keep_head=True)"))
        elif not matches_any(site.name, config.include):
            report.skipped.append(SkippedSite(site.name, site.node.name, f"not matched by include={list(config.include)}"))
        elif matches_any(site.name, config.exclude):
            report.skipped.append(SkippedSite(site.name, site.node.name, f"matched by exclude={list(config.exclude)}"))
        else:
            by_weight.setdefault(site.weight_target, []).append(site)

    site_nodes = {s.node for s in sites}
    selected: list[tuple[str, list[LinearSite]]] = []
    for target, group in by_weight.items():
        aliases = _aliases(gm, target)
        readers = []
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in aliases:
                readers.extend(_consumers(node, _TRANSPOSES))
        foreign = [r for r in readers if r not in site_nodes or r not in {s.node for s in group}]
        layouts = {s.layout for s in group}
        if foreign:
            report.skipped.extend(
                SkippedSite(s.name, s.node.name, f"weight {target!r} is also read by node {foreign[0].name!r} "
                            f"({foreign[0].target}); tied weights stay in full precision (untie them to quantize)")
                for s in group
            )
        elif len(layouts) > 1:
            report.skipped.extend(SkippedSite(s.name, s.node.name, "weight used in both layouts") for s in group)
        else:
            selected.append((target, group))
    return report, selected


@dataclass
class _PlaceholderInit:
    a1: torch.Tensor
    a2: torch.Tensor
    c: torch.Tensor | None


def _placeholder_init(latent: torch.Tensor, group_size: int, with_offset: bool) -> _PlaceholderInit:
    """Zero scales (and offset) ``[N, ceil(K/G)]`` on the weight's device (``structure_only``)."""
    n, k = latent.shape
    shape = (n, -(-k // group_size))
    zeros = lambda: torch.zeros(shape, device=latent.device)  # noqa: E731
    return _PlaceholderInit(zeros(), zeros(), zeros() if with_offset else None)


def _init_layer(latent: torch.Tensor, config: DBLLMConfig, name: str) -> tuple[Any, float]:
    """Initial parameters of one layer for the configured codebook: ``(init, mirrored fraction)``;
    ``init`` has ``a1``, ``a2``, ``mse`` and, for the sign codebook, ``c``."""
    kwargs = dict(method=config.init, grid_points=config.init_grid_points,
                  refine_iters=config.init_refine_iters, name=name)
    if config.codebook == "sign":
        return init_sign_scales(latent, config.group_size, **kwargs), float("nan")
    init = init_scales(latent, config.group_size, **kwargs)
    return init, float(init.mirrored.float().mean())


def quantize_linears(
    gm: fx.GraphModule,
    config: DBLLMConfig,
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
    structure_only: bool = False,
) -> PassReport:
    """Rewrite the selected linears of ``gm`` in place; returns the report.

    With ``structure_only=True`` the graph and the attributes are rewritten exactly as usual but
    no weight value is read: scales are zeros of the right shape and no initialisation runs
    (``init_mse`` is NaN). This is how a saved artifact is rebuilt from a skeleton with
    placeholder (or meta) weights before its stored tensors are loaded
    (:mod:`dbllm_compile.artifact.rebuild`).

    Example:
        >>> from dbllm_compile.passes.export import export_model
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> ep, _ = export_model(m, (torch.randn(2, 64),))
        >>> gm = ep.module()
        >>> report = quantize_linears(gm, DBLLMConfig())
        >>> [q.name for q in report.rewritten], [s.name for s in report.skipped]
        (['0'], ['2'])
    """
    report, selected = select_linears(gm, config)
    act_g = config.activation_group_size
    if config.activation_bits == 4 and act_g:  # fail before the (slow) initialisation
        bad = [g[0] for _, g in selected if g[0].in_features % act_g]
        if bad:
            raise ConfigError(
                f"activation_group_size={act_g} does not divide the input features of {bad[0].name} "
                f"(K={bad[0].in_features}; {len(bad)} layer(s) in all: {[s.name for s in bad[:4]]}): choose an "
                f"activation group size that divides every quantized layer's in_features, or 0 for one "
                f"scale per token"
            )
    if config.rotation_block:
        from dbllm_compile.passes.rotation import check_rotation_fits

        check_rotation_fits([(g[0].name, g[0].in_features) for _, g in selected], config.rotation_block)
    iterator: Iterable = selected
    if progress is not None:
        iterator = progress(selected)
    G = config.group_size
    for target, group in iterator:
        site = group[0]
        weight = get_attr_value(gm, target).detach()
        latent = (weight if site.layout == "nk" else weight.t()).contiguous().clone()
        if config.rotation_block and not structure_only:
            latent = rotate_weight(latent, config.rotation_block)
        with_offset = config.codebook == "sign"
        if structure_only:
            init: Any = _placeholder_init(latent, G, with_offset)
            mirrored = float("nan")
        else:
            check_weight(latent, site.name)
            init, mirrored = _init_layer(latent, config, site.name)
        a1_target, a2_target, c_target = f"{target}_a1", f"{target}_a2", f"{target}_c"
        _set_attr(gm, target, latent, parameter=True)
        _set_attr(gm, a1_target, init.a1.float(), parameter=True)
        _set_attr(gm, a2_target, init.a2.float(), parameter=True)
        if with_offset:
            _set_attr(gm, c_target, init.c.float(), parameter=True)
        for s in group:
            node = s.node
            with gm.graph.inserting_before(node):
                w_node = gm.graph.get_attr(target)
                a1_node = gm.graph.get_attr(a1_target)
                a2_node = gm.graph.get_attr(a2_target)
                args = (s.x, w_node, a1_node, a2_node, s.bias, G, config.torch_scale_dtype)
                if with_offset:  # c is the op's last argument; the {0,1} form keeps seven
                    args = (*args, gm.graph.get_attr(c_target))
                new = gm.graph.call_function(TRAIN_OP, args)
            replace_node(gm, node, new)
        k_pad = padded_in_features(site.in_features, G)
        if k_pad != site.in_features:
            report.notes.append(
                f"{site.name}: in_features {site.in_features} is not a multiple of group_size {G}; "
                f"zero-padded to {k_pad} inside the quantizer"
            )
        report.rewritten.append(
            QuantizedLayer(
                name=site.name,
                weight=target,
                nodes=[s.node.name for s in group],
                kind=site.kind,
                layout=site.layout,
                in_features=site.in_features,
                out_features=site.out_features,
                padded_in_features=k_pad,
                init_mse=float("nan") if structure_only else float(init.mse.mean()),
                mirrored_fraction=mirrored,
            )
        )
    if config.rotation_block:
        from dbllm_compile.passes.rotation import insert_input_rotation

        report.rotations = insert_input_rotation(gm, config.rotation_block)
    if config.activation_bits == 4:
        from dbllm_compile.passes.activation_quant import insert_activation_quant

        report.activation_quantizers = insert_activation_quant(gm, config.activation_group_size)
    gm.graph.lint()
    gm.recompile()
    report.blocks = find_blocks(gm, [q.name for q in report.rewritten])
    return report
