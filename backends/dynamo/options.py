"""``options={...}`` of ``torch.compile(model, backend="dbllm", options=...)``, validated.

:class:`CompileOptions` is frozen and validated on construction (every error names the option,
the value received and what is allowed); :meth:`CompileOptions.from_options` builds it from the
dict ``torch.compile`` passes to the backend and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ConfigError

__all__ = ["CompileOptions", "ACTIVATION_MODES", "QUANTIZE_MODES"]

ACTIVATION_MODES = ("a16",)
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""Modes of ``options["mode"]`` (those of ``torch.compile(mode=...)``)."""

"""Implemented activation modes: ``"a16"`` keeps activations in the model's dtype."""

QUANTIZE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class CompileOptions:
    """Configuration of the ``"dbllm"`` torch.compile backend.

    Args:
        group_size, include, exclude, keep_head, init, init_grid_points, init_refine_iters,
            scale_dtype, codebook, rotation_block: as in :class:`dbllm_compile.DBLLMConfig`, for the linears the backend
            quantizes on the fly. ``init`` defaults to ``"mse"`` (per-group error minimisation);
            ``"maxabs"`` is much faster to compute but about 500x worse in perplexity on
            SmolLM2-135M: use it for speed measurements only.
        activations: ``"a16"`` (activations in the model's dtype). ``"a4"`` (W(1+1)A4) is not
            implemented yet and is rejected.
        quantize: on-the-fly quantization of plain linears. ``"auto"``: only in graphs that hold
            no dual-binary op yet (a plain model; a model from ``quantize()``/``convert()`` is
            lowered as it is); ``"always"``; ``"never"`` (lower existing dual-binary ops only).
        artifact: path of a trained artifact (what ``dbllm-compile quantize`` or
            :func:`dbllm_compile.artifact.save_deployed` writes) whose packed layers replace the on-the-fly
            quantization of the layers it names (:func:`dbllm_compile.artifact.load_layers`);
            linears it does not hold stay in full precision, as the artifact kept them. An
            artifact trained with a Hadamard rotation brings its ``rotation_block``: the option may
            repeat it, a different value is an error.
        decompose_train: in training graphs, replace ``dbllm::db_linear_train`` (opaque to
            Inductor) by the same computation in plain torch ops with straight-through
            estimators, so Inductor fuses the bit assignment and dequantization. ``"auto"``
            (default): on CUDA only. On CPU the measurements disagree (SmolLM2 shape, shared 2-core
            machine: 8x slower than eager with 30 layers, 1.1x faster with 4), so the op stays
            opaque there until measured on a quiet machine.
        gpu_op: on CUDA, run dual-binary linears as ``dbllm::db_linear_gpu`` (a ``triton_op``
            Inductor sees, weights repacked once into the GPU layout at compile time) instead
            of the opaque ``dbllm::db_linear``.
        fuse_siblings: fuse ``db_linear_gpu`` calls that read the same activation (``q/k/v_proj``,
            ``gate/up_proj``) into one call on concatenated weights plus a slice per layer
            (:mod:`.fusion`; same numbers, fewer kernel launches, the activation read once).
        fuse_glu: rewrite a gated MLP's ``silu(gate_proj(x)) * up_proj(x)`` on two
            ``db_linear_gpu`` calls into one ``dbllm::db_glu_gpu`` call (:mod:`.fusion`): at
            batch 1 the gemv computes the gate in its epilogue (one launch instead of two per
            MLP); other batches run the linear and the elementwise product as before.
        pdl: batch-1 gemvs launched with programmatic dependent launch, and Inductor's kernels
            compiled with its PDL code (:mod:`.pdl`). ``"auto"`` (default): where the GPU
            (Hopper or later) and the Inductor version support it; ``True``: an error where they
            do not; ``False``: never.
        inductor: lower the rewritten graph with Inductor (``compile_fx``); ``False`` runs it
            eagerly (debugging, fast tests).
        inductor_options: Inductor config patches (as ``torch.compile(options=...)`` takes for
            the ``"inductor"`` backend), applied after those of ``mode``.
        int_activations: in a deployed W(1+1)A4 model, rewrite ``act_quant`` + ``db_linear`` into
            ``act_quant_int`` + ``db_linear_a4`` (int8 codes, the A4 Triton GEMM on CUDA; see
            ``passes/int_activations.py``). Off by default until its GPU speed is measured; on
            CPU it changes nothing numerically (the reference ops are bit-identical). Per-token
            quantizers only: those with per-group scales (``activation_group_size > 0``) stay
            ``act_quant`` + ``db_linear`` and are recorded as fallbacks.
        mode: Inductor mode of the non-quantized part (``"default"``, ``"reduce-overhead"``: CUDA
            graphs, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``). ``torch.compile``
            refuses ``mode=`` together with ``options=``, so with options the mode goes here;
            ``torch.compile(model, backend="dbllm", mode=...)`` without options works too.
        strict: raise instead of skipping a linear the backend cannot quantize (a computed
            weight, a non-parameter weight, a weight in both layouts). Heads, excluded and tied
            weights are skipped by configuration, never an error.

    Example:
        >>> CompileOptions.from_options({"group_size": 128, "exclude": ["*.mlp.down_proj"]}).group_size
        128
    """

    group_size: int = 64
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_head: bool = True
    init: str = "mse"
    init_grid_points: int = 48
    init_refine_iters: int = 0
    scale_dtype: str = "float16"
    codebook: str = "binary"
    rotation_block: int = 0
    activations: str = "a16"
    quantize: str = "auto"
    artifact: str | None = None
    decompose_train: bool | str = "auto"
    gpu_op: bool = True
    fuse_siblings: bool = True
    fuse_glu: bool = True
    pdl: bool | str = "auto"
    inductor: bool = True
    inductor_options: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = False
    mode: str | None = None
    int_activations: bool = False

    def __post_init__(self) -> None:
        if self.activations == "a4":
            raise ConfigError(
                "torch.compile backend 'dbllm': options['activations']='a4' (4-bit activations, "
                "W(1+1)A4) is not implemented yet; use 'a16' (activations in the model's dtype)"
            )
        if self.activations not in ACTIVATION_MODES:
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['activations'] must be one of "
                f"{list(ACTIVATION_MODES)}, got {self.activations!r}"
            )
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['quantize'] must be one of "
                f"{list(QUANTIZE_MODES)}, got {self.quantize!r}"
            )
        if self.pdl not in (True, False, "auto"):
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['pdl'] must be True, False or 'auto', got {self.pdl!r}"
            )
        if self.decompose_train not in (True, False, "auto"):
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['decompose_train'] must be True, False or "
                f"'auto', got {self.decompose_train!r}"
            )
        for name in ("keep_head", "gpu_op", "fuse_siblings", "fuse_glu", "inductor", "strict", "int_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"torch.compile backend 'dbllm': options[{name!r}] must be True or False, "
                    f"got {getattr(self, name)!r}"
                )
        if self.mode is not None and self.mode not in INDUCTOR_MODES:
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['mode'] must be one of {list(INDUCTOR_MODES)} "
                f"or None, got {self.mode!r}"
            )
        if not isinstance(self.inductor_options, Mapping):
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['inductor_options'] must be a dict of "
                f"Inductor config patches, got {type(self.inductor_options).__name__}"
            )
        if self.artifact is not None and not isinstance(self.artifact, str):
            raise ConfigError(
                f"torch.compile backend 'dbllm': options['artifact'] must be a path string, "
                f"got {type(self.artifact).__name__}"
            )
        object.__setattr__(self, "include", (self.include,) if isinstance(self.include, str) else tuple(self.include))
        object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))
        self.db_config()  # validates the quantization fields (ConfigError names the field)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "CompileOptions" | None) -> "CompileOptions":
        """Build from the ``options`` dict given to ``torch.compile`` (``None``: defaults)."""
        if options is None:
            return cls()
        if isinstance(options, CompileOptions):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"torch.compile backend 'dbllm': options must be a dict, got {type(options).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"torch.compile backend 'dbllm': unknown option(s) {unknown}; known options are "
                f"{sorted(known)} (docs/compile.md)"
            )
        return cls(**dict(options))

    def db_config(self) -> DBLLMConfig:
        """The :class:`DBLLMConfig` of the on-the-fly quantization."""
        return DBLLMConfig(
            group_size=self.group_size,
            include=self.include,
            exclude=self.exclude,
            keep_head=self.keep_head,
            init=self.init,  # type: ignore[arg-type]
            init_grid_points=self.init_grid_points,
            init_refine_iters=self.init_refine_iters,
            scale_dtype=self.scale_dtype,
            codebook=self.codebook,  # type: ignore[arg-type]
            rotation_block=self.rotation_block,
        )
