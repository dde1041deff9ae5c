"""Public API: quantize a model into its trainable dual-binary form, and convert it to bits."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx

from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import DBLLMError
from dbllm_compile.ops import ACT_QUANT_TRAIN_OP, DEPLOY_OP, TRAIN_OP, op_arguments
from dbllm_compile.passes.export import export_model
from dbllm_compile.passes.pack_linears import pack_linears
from dbllm_compile.passes.quantize_linears import PassReport, quantize_linears

__all__ = ["DBLLMModel", "SizeReport", "quantize", "convert"]


def _tqdm(desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, disable=not enabled, unit="layer", leave=False)


@dataclass(frozen=True)
class SizeReport:
    """Storage of a model.

    Attributes:
        total_bytes: every parameter and buffer, at its dtype (tied tensors counted once).
        quantized_weights: number of weights held as dual-binary.
        quantized_bytes: bytes of their packed bits plus scales (and offsets ``c`` of the sign
            codebook) in the deploy form.
        bits_per_weight: ``8 * quantized_bytes / quantized_weights``.
    """

    total_bytes: int
    quantized_weights: int
    quantized_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6


class DBLLMModel(torch.nn.Module):
    """A model whose linears are dual-binary ops.

    ``stage == "train"``: the output of :func:`quantize`; latent weights and float32 scales are
    parameters, trainable with any optimizer. ``stage == "deploy"``: the output of
    :func:`convert`; packed bits and stored scales are buffers.

    Attributes:
        graph_module: the rewritten exported graph (call it like the original model).
        config: the :class:`DBLLMConfig` used.
        report: the :class:`~dbllm_compile.passes.quantize_linears.PassReport`.
        stage: ``"train"`` or ``"deploy"``.
        fixed_kwargs: non-tensor keyword arguments the model was exported with (e.g.
            ``use_cache=False``); they are baked into the graph, so calls may omit them.
        example_spec: shapes and dtypes of the example inputs it was exported with
            (:func:`dbllm_compile.artifact.source.describe_inputs`), or ``None``; artifacts use
            it to re-export the model.
        architecture: what the source model was (:func:`dbllm_compile.artifact.source.
            describe_architecture`: class, and the Hugging Face config for transformers models),
            or ``None``; artifacts use it to rebuild the model without its weights.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        config: DBLLMConfig,
        report: PassReport,
        stage: str,
        fixed_kwargs: dict[str, Any] | None = None,
        *,
        example_spec: dict[str, Any] | None = None,
        architecture: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.report = report
        self.stage = stage
        self.fixed_kwargs = dict(fixed_kwargs or {})
        self.example_spec = example_spec
        self.architecture = architecture

    def train(self, mode: bool = True) -> "DBLLMModel":
        """Set the flag only: the exported graph was traced in eval mode and has no train mode
        (dropout and friends are fixed at export), so this never recurses into it."""
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for key, value in self.fixed_kwargs.items():
            if key in kwargs and kwargs[key] != value:
                raise DBLLMError(
                    f"this model was exported with {key}={value!r}, which is baked into its graph; "
                    f"it cannot be called with {key}={kwargs[key]!r} (quantize again with "
                    f"example_kwargs={{{key!r}: {kwargs[key]!r}}})"
                )
            kwargs.setdefault(key, value)
        return self.graph_module(*args, **kwargs)

    def _op_nodes(self) -> list[fx.Node]:
        op = TRAIN_OP if self.stage == "train" else DEPLOY_OP
        return [n for n in self.graph_module.graph.nodes if n.op == "call_function" and n.target == op]

    def _attr(self, target: str) -> torch.Tensor:
        obj: Any = self.graph_module
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def scale_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The learnable scales ``a1``, ``a2`` of every dual-binary layer, and the offset ``c`` of
        each layer of the sign codebook (train stage): the per-group parameters, trained together."""
        self._require_stage("train", "scale_parameters")
        seen: set[str] = set()
        for node in self._op_nodes():
            args = op_arguments(node)
            for arg in (args["a1"], args["a2"], args["c"]):
                if arg is not None and arg.target not in seen:
                    seen.add(arg.target)
                    yield self._attr(arg.target)

    def latent_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The latent weights of every dual-binary layer (train stage; trained through the STE)."""
        self._require_stage("train", "latent_parameters")
        seen: set[str] = set()
        for node in self._op_nodes():
            target = node.args[1].target
            if target not in seen:
                seen.add(target)
                yield self._attr(target)

    def activation_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The clip logits of the 4-bit activation quantizers (train stage, ``activation_bits=4``;
        one per quantized activation, shared by sibling linears)."""
        self._require_stage("train", "activation_parameters")
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function" and node.target == ACT_QUANT_TRAIN_OP:
                yield self._attr(node.args[1].target)

    def _require_stage(self, stage: str, what: str) -> None:
        if self.stage != stage:
            raise DBLLMError(f"{what}() needs a model in the {stage!r} stage; this one is {self.stage!r}")

    def size_report(self) -> SizeReport:
        """Bytes of the model as it would be deployed (see :class:`SizeReport`)."""
        seen: set[int] = set()
        total = 0
        for t in list(self.graph_module.parameters()) + list(self.graph_module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        nq = 0
        qbytes = 0
        scale_size = self.config.torch_scale_dtype.itemsize
        for layer in self.report.rewritten:
            nq += layer.in_features * layer.out_features
            groups = layer.padded_in_features // self.config.group_size
            qbytes += 2 * layer.out_features * layer.padded_in_features // 8
            qbytes += self.config.scales_per_group * layer.out_features * groups * scale_size
        if self.stage == "train":  # count the deployed storage, not the latent weights
            latent = sum(p.numel() * p.element_size() for p in self.latent_parameters())
            scales = sum(p.numel() * p.element_size() for p in self.scale_parameters())
            total = total - latent - scales + qbytes
        return SizeReport(total_bytes=total, quantized_weights=nq, quantized_bytes=qbytes)


def quantize(
    model: torch.nn.Module,
    example_inputs: tuple = (),
    config: DBLLMConfig | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> DBLLMModel:
    """Export ``model`` and rewrite its linears into trainable dual-binary ops.

    The model is traced with ``torch.export`` (dynamic batch and sequence where possible);
    every linear in the graph — ``nn.Linear``, ``x @ W``, ``addmm`` including transposed
    layouts such as GPT-2's ``Conv1D`` — that the config selects is replaced by
    ``dbllm.db_linear_train`` with learnable scales initialised by per-group error
    minimisation. ``model`` itself is not modified.

    Args:
        model: any module ``torch.export`` can trace.
        example_inputs: positional example inputs (batch and sequence >= 2 to keep them dynamic).
        config: a :class:`DBLLMConfig`; defaults to ``DBLLMConfig()``.
        example_kwargs: keyword example inputs (e.g. ``{"use_cache": False}`` for HF models).
        progress: show a progress bar over layers.

    Returns:
        A :class:`DBLLMModel` in the ``"train"`` stage; ``.report`` says what was rewritten.

    Example:
        >>> import dbllm_compile
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        >>> q = dbllm_compile.quantize(mlp, (torch.randn(4, 64),), dbllm_compile.DBLLMConfig(keep_head=False), progress=False)
        >>> len(q.report.rewritten), q(torch.randn(3, 64)).shape
        (2, torch.Size([3, 64]))
    """
    from dbllm_compile.artifact.source import describe_architecture, describe_inputs

    config = config or DBLLMConfig()
    if not isinstance(config, DBLLMConfig):
        raise TypeError(f"config must be a DBLLMConfig, got {type(config).__name__}")
    was_training = model.training
    model.eval()
    try:
        ep, notes = export_model(model, example_inputs, example_kwargs, dynamic=config.dynamic)
    finally:
        model.train(was_training)
    gm = ep.module()
    report = quantize_linears(gm, config, progress=_tqdm("quantize", progress))
    report.notes[:0] = notes
    fixed = {k: v for k, v in (example_kwargs or {}).items() if not isinstance(v, torch.Tensor) and not _has_tensor(v)}
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return DBLLMModel(gm, config, report, stage="train", fixed_kwargs=fixed,
                      example_spec=describe_inputs(example_inputs, example_kwargs or {}),
                      architecture=describe_architecture(model))


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def convert(qmodel: DBLLMModel, *, inplace: bool = False, progress: bool = True) -> DBLLMModel:
    """Pack a trained model: bits and stored scales replace latent weights and float32 scales.

    The result computes exactly what ``qmodel`` computes (same bits, same rounded scales).

    Example:
        >>> import dbllm_compile
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        >>> x = torch.randn(3, 64)
        >>> q = dbllm_compile.quantize(mlp, (x,), progress=False)
        >>> d = dbllm_compile.convert(q, progress=False)
        >>> torch.equal(q(x), d(x))
        True
    """
    if not isinstance(qmodel, DBLLMModel) or qmodel.stage != "train":
        got = qmodel.stage if isinstance(qmodel, DBLLMModel) else type(qmodel).__name__
        raise DBLLMError(f"convert() takes the output of quantize() (a DBLLMModel in the 'train' stage), got {got!r}")
    gm = qmodel.graph_module if inplace else copy.deepcopy(qmodel.graph_module)
    with torch.no_grad():
        pack_linears(gm, progress=_tqdm("convert", progress))
    for p in gm.parameters():
        p.requires_grad_(False)
    return DBLLMModel(gm, qmodel.config, qmodel.report, stage="deploy", fixed_kwargs=qmodel.fixed_kwargs,
                      example_spec=qmodel.example_spec, architecture=qmodel.architecture)


def add_activation_quant(qmodel: DBLLMModel, *, group_size: int | None = None) -> DBLLMModel:
    """Insert learnable 4-bit activation quantizers into a trained 16-bit-activation model, in place.

    Stage 3 of W(1+1)A4 (LBLLM): after the weights were distilled with activations in full
    precision, one ``dbllm.act_quant_train`` per distinct linear input is inserted (q/k/v share
    one, gate/up share one; see :mod:`dbllm_compile.passes.activation_quant`), its clip factor
    initialised to ``r = 0.95``; train the factors with ``DistillConfig(train_weights=False)``.

    ``group_size``: activation scale granularity, ``0`` one scale per token, ``G > 0`` one per
    token and group of ``G`` input features (must divide every quantized layer's input features;
    a :class:`~dbllm_compile.errors.ConfigError` otherwise, before anything changes). ``None``
    (default) takes ``qmodel.config.activation_group_size``.
    The config becomes ``activation_bits=4`` with that ``activation_group_size``;
    ``qmodel.report.activation_quantizers`` lists the quantizers.

    Example:
        >>> import dbllm_compile
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        >>> q = dbllm_compile.quantize(mlp, (torch.randn(4, 64),), dbllm_compile.DBLLMConfig(keep_head=False), progress=False)
        >>> q = dbllm_compile.add_activation_quant(q, group_size=32)
        >>> q.config.activation_bits, q.config.activation_group_size, len(list(q.activation_parameters()))
        (4, 32, 2)
    """
    import dataclasses

    from dbllm_compile.passes.activation_quant import insert_activation_quant

    if not isinstance(qmodel, DBLLMModel) or qmodel.stage != "train":
        got = qmodel.stage if isinstance(qmodel, DBLLMModel) else type(qmodel).__name__
        raise DBLLMError(f"add_activation_quant() takes the output of quantize() (the 'train' stage), got {got!r}")
    if qmodel.config.activation_bits == 4:
        raise DBLLMError("add_activation_quant(): this model already quantizes its activations to 4 bits "
                         "(quantized with activation_bits=4 or passed here before)")
    if group_size is None:
        group_size = qmodel.config.activation_group_size
    # validates group_size first (ConfigError); the model is unchanged if it is refused
    config = dataclasses.replace(qmodel.config, activation_bits=4, activation_group_size=group_size)
    gm = qmodel.graph_module
    qmodel.report.activation_quantizers = insert_activation_quant(gm, group_size)
    gm.graph.lint()
    gm.recompile()
    qmodel.config = config
    return qmodel
