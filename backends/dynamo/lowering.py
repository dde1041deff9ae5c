"""The graph rewrites of the ``"dbllm"`` backend, on the torch-level graph Dynamo captures.

=============================================  ==============================================
node                                           becomes
=============================================  ==============================================
linear / matmul / addmm with a parameter       ``dbllm::db_linear_gpu`` (CUDA, fp16/bf16, weights
weight (on-the-fly mode, :func:`quantize_graph`) in the GPU layout) or ``dbllm::db_linear``
                                               (otherwise), weights quantized once and cached
``dbllm::db_linear`` (from ``convert()``)      ``dbllm::db_linear_gpu`` on CUDA with fp16/bf16
                                               activations (weights repacked once); unchanged
                                               elsewhere and for the sign codebook (offset ``c``)
``dbllm::db_linear_train`` (from ``quantize()``) :func:`~.train_decomposition.db_linear_train_decomposed` (plain torch
                                               ops, straight-through estimators) so Inductor
                                               fuses it; unchanged with ``decompose_train=False``
``dbllm::hadamard`` (``rotation_block > 0``)    :func:`~dbllm_compile.passes.decompose.hadamard_decomposed`
                                               (reshape + float32 matmul with ``H_B``), always:
                                               Inductor fuses it with its neighbours
=============================================  ==============================================

Sign codebook (``options["codebook"] = "sign"``, or an op carrying the offset ``c``): the layer
stays on ``dbllm::db_linear`` with ``c`` as its last argument; on CUDA its dispatcher runs the
Triton kernel and adds the offset term after it (:mod:`dbllm_compile.backends.triton.dispatch`).
``dbllm::db_linear_gpu`` has no offset argument (its kernels are being rewritten separately).

Both rewrites keep the calling convention of the graph (placeholders stay, possibly unused),
add the quantized weights as buffers of the graph module (Inductor and AOTAutograd treat them
as constants of the graph) and lint the graph.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import fx

from dbllm_compile.errors import GraphPassError
from dbllm_compile.ops import DEPLOY_OP, HADAMARD_OP, TRAIN_OP, op_arguments
from dbllm_compile.passes.dynamo_graph import normalize_dynamo_graph, restore_parameter_inputs
from dbllm_compile.passes.linear_match import get_attr_value
from dbllm_compile.passes.quantize_linears import replace_node, select_linears

from .diagnostics import GraphRecord
from .options import CompileOptions
from .train_decomposition import db_linear_train_decomposed
from .weights import load_artifact_layers, quantized_weights

__all__ = ["quantize_graph", "lower_dbllm_ops", "db_linear_train_decomposed", "gpu_kernels_available"]

# Skip reasons that come from the configuration, never an error under strict=True.
_CONFIGURED = ("output head kept", "not matched by include", "matched by exclude", "tied weights",
               "not a layer of the artifact")


def gpu_kernels_available() -> bool:
    """Whether ``dbllm::db_linear_gpu`` (the Triton kernels) is registered."""
    from dbllm_compile import backends

    return backends.triton_available and hasattr(torch.ops.dbllm, "db_linear_gpu")


def _gpu_form(x_val: Any, device: torch.device, opts: CompileOptions) -> torch.dtype | None:
    """The activation dtype to prepare GPU-layout weights for, or None for the reference op."""
    from dbllm_compile.backends.triton.layout import supports_group_size

    if not (opts.gpu_op and device.type == "cuda" and gpu_kernels_available()):
        return None
    if not isinstance(x_val, torch.Tensor) or x_val.dtype not in (torch.float16, torch.bfloat16):
        return None
    return x_val.dtype if supports_group_size(opts.group_size) else None


def _register_buffer(gm: fx.GraphModule, target: str, value: torch.Tensor) -> str:
    """Add a constant tensor to the graph module at ``target``.

    AOTAutograd lifts every parameter and buffer of a Dynamo graph module as an input and looks
    its Dynamo source up in ``gm._param_name_to_source``; ours get a ``ConstantSource`` (no
    guard: the tensor is owned by the compiled graph and never changes).
    """
    from torch._dynamo.source import ConstantSource

    owner_path, _, attr = target.rpartition(".")
    owner = gm
    for part in owner_path.split(".") if owner_path else ():
        if part not in owner._modules:
            owner.add_module(part, torch.nn.Module())
        owner = owner._modules[part]
    owner.register_buffer(attr, value)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[target] = ConstantSource(f"__dbllm_const_{target}")
    return target


def _weight_device(gm: fx.GraphModule, target: str) -> torch.device:
    return get_attr_value(gm, target).device


def _artifact_rotation(opts: CompileOptions) -> int:
    """The Hadamard block of the run: ``options["rotation_block"]``, or the artifact's when the
    option is left at 0. An artifact's layers hold ``W @ Q``; without the rotation of their input
    they compute something else, so a conflict is an error, never a silent choice."""
    if not opts.artifact:
        return opts.rotation_block
    from dbllm_compile.artifact.format import read_manifest

    stored = int(read_manifest(opts.artifact)["config"].get("rotation_block", 0) or 0)
    if opts.rotation_block and opts.rotation_block != stored:
        raise GraphPassError(
            f"torch.compile backend 'dbllm': options['rotation_block']={opts.rotation_block} but the artifact "
            f"{opts.artifact!r} was trained with rotation_block={stored}; leave the option out (the artifact's "
            f"value is used) or set it to {stored}"
        )
    return stored


def _rotate_inputs(gm: fx.GraphModule, selected: list, block: int) -> None:
    """Insert one Hadamard rotation (plain ops: :func:`hadamard_decomposed`) per distinct input of
    the selected linears, right after that input, and make the linears read it: siblings (q/k/v,
    gate/up) share one rotation, as in :func:`dbllm_compile.passes.rotation.insert_input_rotation`."""
    from dbllm_compile.passes.decompose import hadamard_decomposed
    from dbllm_compile.passes.rotation import check_rotation_fits

    check_rotation_fits([(s.name, s.in_features) for _, group in selected for s in group], block)
    rotated: dict[fx.Node, fx.Node] = {}
    for _, group in selected:
        for s in group:
            if s.x not in rotated:
                with gm.graph.inserting_after(s.x):
                    node = gm.graph.call_function(hadamard_decomposed, (s.x, block))
                # same shape, dtype and device: the GPU-form choice and the later rewrites read it
                node.meta.update({k: s.x.meta[k] for k in ("val", "example_value") if k in s.x.meta})
                rotated[s.x] = node
            s.x = rotated[s.x]


def quantize_graph(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, record: GraphRecord) -> None:
    """On-the-fly mode: quantize the selected linears of a Dynamo graph in place.

    With ``rotation_block`` (the option, or the artifact's) the weights are quantized as ``W @ Q``
    and each linear reads its input rotated by the block-diagonal Hadamard ``Q``, as
    :func:`dbllm_compile.quantize` does for the same config. With ``artifact`` only the artifact's
    layers become dual-binary (its bits and scales); a selected linear it does not hold stays in
    full precision, as the artifact kept it, and is listed in ``record.skipped``.
    """
    frozen = normalize_dynamo_graph(gm, example_inputs)
    try:
        config = dataclasses.replace(opts.db_config(), rotation_block=_artifact_rotation(opts))
        report, selected = select_linears(gm, config)
        artifact = load_artifact_layers(opts.artifact) if opts.artifact else {}
        for s in report.skipped:
            if opts.strict and not any(c in s.reason for c in _CONFIGURED):
                raise GraphPassError(
                    f"torch.compile backend 'dbllm' (strict=True): cannot quantize layer {s.name!r} at node "
                    f"{s.node!r}: {s.reason}. Exclude it (options={{'exclude': [{s.name!r}]}}) or drop strict"
                )
            record.skipped.append((s.name, s.node, s.reason))
        G = config.group_size
        if opts.artifact:  # the artifact's model: its layers in 2 bits, every other layer as it kept it
            if selected and not any(target in artifact for target, _ in selected):
                raise GraphPassError(
                    f"torch.compile backend 'dbllm': none of the {len(selected)} linear(s) of this graph is a layer "
                    f"of the artifact {opts.artifact!r} (graph weight {selected[0][0]!r}, artifact layer "
                    f"{next(iter(artifact), None)!r}); compile the model the artifact was made from"
                )
            for target, group in selected:
                if target not in artifact:
                    record.skipped.extend((s.name, s.node.name, "not a layer of the artifact (kept in full "
                                           "precision, as in the artifact)") for s in group)
            selected = [(target, group) for target, group in selected if target in artifact]
        if config.rotation_block:
            _rotate_inputs(gm, selected, config.rotation_block)
            record.lowered["hadamard:decomposed"] += len({s.x for _, group in selected for s in group})
        for target, group in selected:
            site = group[0]
            param = get_attr_value(gm, target)
            form = _gpu_form(site.x.meta.get("val"), param.device, opts)
            if config.codebook == "sign":
                form = None  # db_linear_gpu has no offset: the dispatcher adds it (module docstring)
            if target in artifact:
                packed, a1, a2, g_art, c = artifact[target]
                if g_art != G:
                    raise GraphPassError(
                        f"artifact layer {target!r} has group_size {g_art}, the backend options say {G}; "
                        f"pass options={{'group_size': {g_art}}}"
                    )
                if c is not None:
                    form = None
                if form is None:
                    value: Any = tuple(t.to(param.device) for t in ((packed, a1, a2) if c is None else (packed, a1, a2, c)))
                else:
                    from dbllm_compile.backends.triton import to_gpu_layout

                    value = to_gpu_layout(packed.to(param.device), a1.to(param.device), a2.to(param.device),
                                          site.in_features, G, form)
                hit = False
            else:
                value, hit = quantized_weights(param, site.layout, config, "reference" if form is None else form, site.name)
            record.weight_cache_hits += int(hit)
            if form is None:  # (packed, a1, a2) or (packed, a1, a2, c)
                names = [_register_buffer(gm, f"{target}_dbllm_{part}", t)
                         for part, t in zip(("packed", "a1", "a2", "c"), value)]
                op = DEPLOY_OP
            else:
                names = [_register_buffer(gm, f"{target}_dbllm_{part}", t)
                         for part, t in (("qweight", value.qweight), ("scales", value.scales))]
                op = torch.ops.dbllm.db_linear_gpu.default
            for s in group:
                node = s.node
                with gm.graph.inserting_before(node):
                    args = [gm.graph.get_attr(n) for n in names]
                    offset = args[3:]  # the sign codebook's c goes last
                    new = gm.graph.call_function(op, (s.x, *args[:3], s.bias, s.in_features, G, *offset))
                replace_node(gm, node, new)
            record.rewritten.append(site.name)
    finally:
        restore_parameter_inputs(gm, frozen)
    gm.graph.lint()


def _placeholder_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, Any]:
    return dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))


def lower_dbllm_ops(gm: fx.GraphModule, example_inputs: list, opts: CompileOptions, record: GraphRecord) -> None:
    """Lower the dual-binary ops already in the graph (a model from ``quantize()``/``convert()``)."""
    from torch._subclasses.fake_tensor import is_fake

    values = _placeholder_values(gm, example_inputs)
    if opts.int_activations:
        from dbllm_compile.passes.int_activations import use_int_activations

        rep = use_int_activations(gm)
        record.lowered["act_quant_int"] += rep.quantizers
        record.lowered["db_linear_a4"] += rep.linears
        record.fallbacks.extend((name, f"int_activations: {why}") for name, why in rep.skipped)
    gpu_index = 0
    gpu_op = getattr(torch.ops.dbllm, "db_linear_gpu", None)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if gpu_op is not None and node.target == gpu_op.default:
            record.lowered["db_linear_gpu"] += 1
        elif node.target == HADAMARD_OP:
            from dbllm_compile.passes.decompose import hadamard_decomposed

            node.target = hadamard_decomposed
            record.lowered["hadamard:decomposed"] += 1
        elif node.target == TRAIN_OP:
            weight = values.get(node.args[1]) if isinstance(node.args[1], fx.Node) else None
            on_cuda = isinstance(weight, torch.Tensor) and weight.device.type == "cuda"
            if opts.decompose_train is True or (opts.decompose_train == "auto" and on_cuda):
                node.target = db_linear_train_decomposed
                record.lowered["db_linear_train:decomposed"] += 1
            else:
                record.lowered["db_linear_train"] += 1
        elif node.target == DEPLOY_OP:
            op_args = op_arguments(node)
            x, packed, a1, a2, bias = (op_args[k] for k in ("x", "packed", "a1", "a2", "bias"))
            in_features, group_size = op_args["in_features"], op_args["group_size"]
            x_val = x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None
            tensors = [values.get(a) if isinstance(a, fx.Node) else None for a in (packed, a1, a2)]
            device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else torch.device("cpu")
            form = _gpu_form(x_val, device, opts)
            from dbllm_compile.backends.triton.layout import supports_group_size

            if form is not None and not supports_group_size(group_size):
                form = None
            if op_args["c"] is not None:
                if device.type == "cuda":
                    record.fallbacks.append((node.name, "sign codebook (offset c): kept on dbllm::db_linear, whose "
                                             "dispatcher adds the offset term after the Triton kernel"))
                record.lowered["db_linear"] += 1
                continue
            if form is None:
                record.lowered["db_linear"] += 1
                if device.type == "cuda":
                    record.fallbacks.append((node.name, _why_not_gpu(x_val, opts, group_size)))
                continue
            if not all(isinstance(t, torch.Tensor) and not is_fake(t) for t in tensors):
                record.lowered["db_linear"] += 1
                record.fallbacks.append((node.name, "packed weights are not graph inputs bound to real tensors; "
                                         "kept on the opaque dbllm::db_linear (Triton dispatcher)"))
                continue
            from dbllm_compile.backends.triton import prepare_cached

            gw = prepare_cached(tensors[0], tensors[1], tensors[2], in_features, group_size, form)
            stem = f"_dbllm_gpu_{gpu_index}_{re.sub(r'[^0-9A-Za-z_]', '_', packed.name)}"
            gpu_index += 1
            names = [_register_buffer(gm, f"{stem}_{part}", t)
                     for part, t in (("qweight", gw.qweight), ("scales", gw.scales))]
            with gm.graph.inserting_before(node):
                args = [gm.graph.get_attr(n) for n in names]
                new = gm.graph.call_function(torch.ops.dbllm.db_linear_gpu.default,
                                             (x, *args, bias, in_features, group_size))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            record.lowered["db_linear_gpu"] += 1
    gm.graph.lint()


def _why_not_gpu(x_val: Any, opts: CompileOptions, group_size: int) -> str:
    if not opts.gpu_op:
        return "gpu_op=False: opaque dbllm::db_linear (Triton dispatcher)"
    if not gpu_kernels_available():
        return "Triton is not installed: dbllm::db_linear runs the torch reference on the GPU"
    if isinstance(x_val, torch.Tensor) and x_val.dtype not in (torch.float16, torch.bfloat16):
        return (f"activations are {x_val.dtype}; the Triton kernels take float16/bfloat16 "
                "(cast the model with model.half()); dbllm::db_linear dequantizes to a dense weight")
    return f"group_size {group_size} is not a multiple of 16 dividing 1024: reference path"
