"""Hugging Face integration: ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.

``import dbllm_compile`` registers, in transformers' quantizer registry
(``transformers.quantizers.auto``), the quantization method ``"dbllm"``: a config class
(:class:`DBLLMHfConfig`) and a quantizer (:class:`DBLLMHfQuantizer`). Then::

    hf_model = to_hf(deployed)                  # a transformers model with DBLinear modules
    hf_model.save_pretrained("out-hf")          # config.json carries quantization_config
    # any process:
    import dbllm_compile
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out-hf")   # 2-bit, generates

The checkpoint is a plain transformers one: each dual-binary layer ``<name>`` is stored as
``<name>.packed`` (uint8 ``[2, N, K_pad/8]``), ``<name>.a1`` / ``<name>.a2`` (scale dtype,
``[N, ceil(K/G)]``), ``<name>.c`` (the offset, same shape and dtype; sign codebook only) and
``<name>.bias``; everything else under its usual name. The
``quantization_config`` lists the layers with their shapes, so ``from_pretrained`` swaps exactly
those modules for :class:`DBLinear` on the meta device before the weights are loaded.

This format works at module level: every dual-binary layer must be the weight of an
``nn.Linear`` (or GPT-2's ``Conv1D``). Sites such as ``x @ self.w`` on a bare parameter are only
expressible in the dbllm checkpoint format (:mod:`.checkpoint`), which works on the graph.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.errors import ArtifactError
from dbllm_compile.reference.dual_binary import num_groups, padded_in_features

__all__ = ["QUANT_METHOD", "HF_FORMAT_VERSION", "DBLinear", "DBLLMHfConfig", "DBLLMHfQuantizer", "register", "to_hf"]

QUANT_METHOD = "dbllm"
HF_FORMAT_VERSION = 3


class DBLinear(torch.nn.Module):
    """A packed dual-binary linear as an ``nn.Module``: ``y = x @ (a1*b1 + a2*b2 (+ c)).T + bias``.

    Buffers: ``packed`` uint8 ``[2, N, K_pad/8]`` (reference layout,
    :mod:`dbllm_compile.reference.packing`), ``a1`` / ``a2`` ``[N, ceil(K/G)]`` in the scale
    dtype, and with ``offset=True`` (sign codebook) ``c``, same shape and dtype; ``bias`` ``[N]``
    (a parameter) or None. ``forward`` calls ``torch.ops.dbllm.db_linear``
    (``x [..., K] -> [..., N]``), so the Triton kernels run on CUDA. With ``rotation_block=B > 0``
    (a model quantized with ``DBLLMConfig.rotation_block``) the input is first rotated by
    ``torch.ops.dbllm.hadamard(x, B)`` (each layer rotates its own input: siblings that share one
    rotation in the graph compute it once per layer here, same numbers).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, *, scale_dtype: torch.dtype = torch.float16,
                 bias: bool = True, bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 offset: bool = False, rotation_block: int = 0):
        super().__init__()
        self.in_features = in_features
        self.rotation_block = rotation_block
        self.out_features = out_features
        self.group_size = group_size
        k_pad = padded_in_features(in_features, group_size)
        groups = num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros((2, out_features, k_pad // 8), dtype=torch.uint8, device=device))
        self.register_buffer("a1", torch.zeros((out_features, groups), dtype=scale_dtype, device=device))
        self.register_buffer("a2", torch.zeros((out_features, groups), dtype=scale_dtype, device=device))
        if offset:
            self.register_buffer("c", torch.zeros((out_features, groups), dtype=scale_dtype, device=device))
        else:
            self.c = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation_block:
            x = torch.ops.dbllm.hadamard(x, self.rotation_block)
        if self.c is None:
            return torch.ops.dbllm.db_linear(x, self.packed, self.a1, self.a2, self.bias, self.in_features, self.group_size)
        return torch.ops.dbllm.db_linear(x, self.packed, self.a1, self.a2, self.bias, self.in_features, self.group_size,
                                         self.c)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scale_dtype={self.a1.dtype}, bias={self.bias is not None}, offset={self.c is not None}"
                + (f", rotation_block={self.rotation_block}" if self.rotation_block else ""))


def _mixin_base() -> type:
    from transformers.utils.quantization_config import QuantizationConfigMixin

    return QuantizationConfigMixin


def _quantizer_base() -> type:
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer


class DBLLMHfConfig(_mixin_base()):
    """``quantization_config`` of a dbllm checkpoint (``quant_method: "dbllm"``).

    Args:
        group_size: input features per scale group.
        scale_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        layers: ``{module name: {"in_features", "out_features", "bias", "offset", "rotation_block"}}``
            of the dual-binary layers (``offset``: the layer has the sign codebook's ``c``;
            ``rotation_block``: its input is Hadamard-rotated in blocks of that many features;
            absent means no).
        dbllm_config: the :class:`~dbllm_compile.DBLLMConfig` as a dict (provenance).
        format_version: version of this layout: 1 ({0,1} layers only), 2 (layers may carry
            ``c``) or 3 (layers may carry ``rotation_block``; written only when one does, so
            checkpoints without rotation stay readable by version-2 readers). An older reader
            would compute without the offset / the rotation, hence the bumps.
    """

    def __init__(self, group_size: int = 64, scale_dtype: str = "float16", layers: dict[str, dict[str, Any]] | None = None,
                 dbllm_config: dict[str, Any] | None = None, format_version: int = HF_FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        self.layers = dict(layers or {})
        self.dbllm_config = dict(dbllm_config or {})
        self.format_version = format_version
        if format_version not in range(1, HF_FORMAT_VERSION + 1):
            raise ArtifactError(
                f"config.json: quantization_config format_version {format_version!r} is not supported by this "
                f"dbllm_compile (it reads 1 to {HF_FORMAT_VERSION}); upgrade dbllm_compile"
            )
        for key, value in kwargs.items():
            setattr(self, key, value)


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, module)


def replace_with_db_linear(model: torch.nn.Module, config: DBLLMHfConfig, *, device: Any = None) -> int:
    """Swap the modules named in ``config.layers`` for empty :class:`DBLinear` modules."""
    scale_dtype = getattr(torch, config.scale_dtype)
    for name, spec in config.layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(
                f"config.json: quantization_config names layer {name!r}, which this {type(model).__name__} does not have; "
                "the checkpoint belongs to another architecture"
            ) from None
        ref = next(iter(old.parameters()), None)
        bias_dtype = spec.get("bias_dtype")
        _set_module(model, name, DBLinear(
            spec["in_features"], spec["out_features"], config.group_size, scale_dtype=scale_dtype,
            bias=spec.get("bias", True),
            bias_dtype=getattr(torch, bias_dtype) if bias_dtype else (ref.dtype if ref is not None else torch.float32),
            device=device if device is not None else (ref.device if ref is not None else None),
            offset=bool(spec.get("offset", False)),
            rotation_block=int(spec.get("rotation_block", 0)),
        ))
    return len(config.layers)


class DBLLMHfQuantizer(_quantizer_base()):
    """Loads pre-quantized dbllm checkpoints (it cannot quantize a float model: use
    :func:`dbllm_compile.quantize` + distillation, then :func:`to_hf`)."""

    requires_calibration = True

    def __init__(self, quantization_config: DBLLMHfConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ArtifactError("quant_method 'dbllm' only loads pre-quantized checkpoints written by dbllm_compile")

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        replace_with_db_linear(model, self.quantization_config)
        # transformers initialises every module not marked initialised after loading, and some
        # models' _init_weights reach into children by name (GPT-2: ``attn.c_proj.weight``),
        # which a DBLinear does not have. All DBLinear tensors come from the checkpoint, so mark
        # them, and their parents when those hold no tensor of their own, as initialised.
        for name in self.quantization_config.layers:
            model.get_submodule(name)._is_hf_initialized = True
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if not any(True for _ in parent.parameters(recurse=False)) and not any(True for _ in parent.buffers(recurse=False)):
                parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_registered = False


def register() -> None:
    """Register ``quant_method="dbllm"`` in transformers' quantizer registry (idempotent;
    called by ``import dbllm_compile`` when transformers is installed)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) not in (None, DBLLMHfConfig):
        raise ArtifactError(f"transformers already has a quantization method {QUANT_METHOD!r} that is not dbllm_compile's")
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(DBLLMHfConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(DBLLMHfQuantizer)
    _registered = True


def to_hf(deployed: DBLLMModel, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """A transformers model computing what ``deployed`` computes, with :class:`DBLinear` layers.

    Args:
        deployed: a deployed model of a Hugging Face architecture (from
            :func:`dbllm_compile.convert` or :func:`~dbllm_compile.artifact.load_deployed`).
        model: the transformers model to fill (deep-copied; its weights are not used). By
            default it is built from ``deployed.architecture`` (the stored HF config).

    Returns:
        The model, in eval mode, with ``config.quantization_config`` set: ``save_pretrained``
        writes a checkpoint that ``from_pretrained`` loads after ``import dbllm_compile``.

    Raises:
        ArtifactError: the architecture is not a transformers model, or a dual-binary layer is
            not the weight of a linear module (see the module docstring).
    """
    from dbllm_compile.artifact.checkpoint import deploy_layer_tensors, graph_tensors
    from dbllm_compile.artifact.source import build_skeleton
    from dbllm_compile.passes.linear_match import get_attr_value

    register()
    if not isinstance(deployed, DBLLMModel) or deployed.stage != "deploy":
        raise ArtifactError("to_hf() takes a deployed model (dbllm_compile.convert() or load_deployed())")
    if model is None:
        model = build_skeleton(deployed.architecture or {}, device="meta", where="to_hf()").to_empty(device="cpu")
    else:
        model = copy.deepcopy(model)
    gm = deployed.graph_module
    from dbllm_compile.ops import ACT_QUANT_OP

    act = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target == ACT_QUANT_OP]
    if act:
        raise ArtifactError(
            f"to_hf(): the model quantizes activations to 4 bits ({len(act)} dbllm.act_quant node(s), "
            f"e.g. {act[0]!r}), which the Hugging Face DBLinear layer does not carry yet; export it "
            f"with save_deployed() / the .pt2 format instead, or quantize with activation_bits=16"
        )
    by_weight = deploy_layer_tensors(gm)
    layers: dict[str, dict[str, Any]] = {}
    quantized_tensors: set[str] = set()
    for layer in deployed.report.rewritten:
        module_name, _, attr = layer.weight.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if attr != "weight" or module is None or not (
            isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        ):
            raise ArtifactError(
                f"to_hf(): dual-binary layer {layer.name!r} ({layer.kind} on {layer.weight!r}) is not the weight of an "
                f"nn.Linear/Conv1D module ({type(module).__name__ if module is not None else 'no module'}), so the "
                "Hugging Face format cannot express it; save it with dbllm_compile.artifact.save_deployed instead"
            )
        names = by_weight[layer.weight]
        quantized_tensors.update(names.values())
        bias_name = f"{module_name}.bias"
        has_bias = getattr(module, "bias", None) is not None
        bias = get_attr_value(gm, bias_name) if has_bias else None
        packed = get_attr_value(gm, names["packed"])
        a1 = get_attr_value(gm, names["a1"])
        new = DBLinear(layer.in_features, layer.out_features, deployed.config.group_size, scale_dtype=a1.dtype,
                       bias=has_bias, bias_dtype=bias.dtype if bias is not None else torch.float32,
                       offset="c" in names, rotation_block=deployed.config.rotation_block)
        new.packed = packed.detach().clone()
        new.a1 = a1.detach().clone()
        new.a2 = get_attr_value(gm, names["a2"]).detach().clone()
        if "c" in names:
            new.c = get_attr_value(gm, names["c"]).detach().clone()
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
            quantized_tensors.add(bias_name)
        _set_module(model, module_name, new)
        layers[module_name] = {"in_features": layer.in_features, "out_features": layer.out_features, "bias": has_bias,
                               "bias_dtype": str(bias.dtype).removeprefix("torch.") if bias is not None else None,
                               "offset": "c" in names, **({"rotation_block": deployed.config.rotation_block}
                                                          if deployed.config.rotation_block else {})}
    # Every other tensor: the deployed graph's value (training may have changed it).
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    clones: dict[int, torch.Tensor] = {}  # one clone per tensor, so tied weights stay tied
    for name, (value, _) in graph_tensors(gm).items():
        if name in quantized_tensors:
            continue
        if name not in targets:
            if name.startswith("_") or "constant" in name:  # torch.export's lifted constants
                continue
            raise ArtifactError(f"to_hf(): the deployed model has tensor {name!r}, which {type(model).__name__} lacks")
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if attr in module._parameters:
            if id(value) not in clones:
                clones[id(value)] = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
            module._parameters[attr] = clones[id(value)]
        else:
            module._buffers[attr] = clones.setdefault(id(value), value.detach().clone())
    model.config.quantization_config = DBLLMHfConfig(
        group_size=deployed.config.group_size, scale_dtype=deployed.config.scale_dtype, layers=layers,
        dbllm_config=deployed.config.to_dict(), format_version=3 if deployed.config.rotation_block else 2,
    )
    model.hf_quantizer = DBLLMHfQuantizer(model.config.quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return model.eval()
