"""The configuration of a dual-binary quantization run.

:class:`DBLLMConfig` is frozen and validated on construction so that a config that exists is a
config that works. It carries a format ``version`` so that saved artifacts stay loadable when
fields are added later.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dbllm_compile.errors import ConfigError

__all__ = ["DBLLMConfig", "ACTIVATION_BITS", "CODEBOOKS", "CONFIG_VERSION", "SCALE_DTYPES"]

CONFIG_VERSION = 1
# Fields added later with defaults that reproduce the earlier behaviour (activation_bits,
# codebook, activation_group_size, rotation_block) keep the version: a version-1 dict without them still loads
# and means the same thing.

ACTIVATION_BITS = (16, 4)

CODEBOOKS = ("binary", "sign")
"""2-bit weight codebooks: DB-LLM's {0,1} form ``a1*b1 + a2*b2`` and LBLLM's sign form, carried as
``a1*b1 + a2*b2 + c`` with a learnable per-group offset ``c``."""

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

InitMethod = Literal["mse", "maxabs"]
Codebook = Literal["binary", "sign"]


@dataclass(frozen=True)
class DBLLMConfig:
    """How linear layers are turned into dual-binary layers.

    Args:
        group_size: input features that share one pair of scales ``(a1, a2)`` per output
            channel. A multiple of 8 (bits are packed eight to a byte). ``in_features`` that
            are not a multiple are zero-padded inside the quantizer (reported by the pass).
        include: module-name patterns (``fnmatch`` globs, or ``re:<regex>``) of the linears to
            quantize; a linear is named by the module that owns its weight, e.g.
            ``model.layers.0.self_attn.q_proj``.
        exclude: patterns to keep in full precision; wins over ``include``.
        keep_head: keep output heads in full precision. A head is a linear whose output
            reaches the graph output without passing through another linear (found on the
            data-flow graph, not by name), e.g. ``lm_head``.
        init: ``"mse"`` picks the grid step ``s`` of every group by minimising the squared
            error over both grid orientations ({-s,0,s,2s} and {-2s,-s,0,s});
            ``"maxabs"`` is the naive ``s = max|w| / 2`` (kept for comparison: it is about 500x
            worse in perplexity on SmolLM2-135M).
        init_grid_points: candidate steps per orientation for ``init="mse"``.
        init_refine_iters: alternating least-squares refinements of ``(a1, a2)`` after the grid
            search (each re-fits the scales to the bits, then re-assigns bits to the nearest
            level); 0 keeps the uniform grid.
        scale_dtype: storage dtype of the scales in the deployed model. The training form
            rounds its scales to it in the forward pass (straight-through), so training and
            deployment compute the same function.
        dynamic: export with dynamic batch and sequence dimensions where the model allows.
        codebook: the 2-bit weight codebook. ``"binary"`` (DB-LLM): ``w = a1*b1 + a2*b2``, levels
            ``{0, a2, a1, a1+a2}`` per group. ``"sign"`` (LBLLM): a third learnable per-group
            parameter ``c`` (``[out, ceil(in/G)]``, float32 while training, stored in
            ``scale_dtype`` like ``a1``/``a2``), ``w = a1*b1 + a2*b2 + c``, initialised to the
            symmetric levels ``{-s_hi, -s_lo, s_lo, s_hi}`` by
            :func:`~dbllm_compile.reference.sign_codebook.init_sign_scales` (``init``,
            ``init_grid_points`` and ``init_refine_iters`` apply to it). ``c`` is then trained
            freely with ``a1``/``a2``: the levels ``{c, c+a2, c+a1, c+a1+a2}`` form a strict
            superset of both codebooks (``c = 0`` is the binary form; symmetry is not enforced).
            Costs one more stored scale per group: 2.75 bits per weight at G=64 with fp16 scales
            (2.5 for ``"binary"``).
        activation_bits: ``16`` keeps the inputs of the quantized linears in full precision;
            ``4`` quantizes them dynamically per token to 4 bits with a learnable clipping
            ratio (:mod:`dbllm_compile.reference.activation`). Linears that read the same
            tensor (q/k/v, gate/up) share one quantized activation and one clip factor.
        activation_group_size: granularity of the 4-bit activation scales. ``0`` (default, the
            behaviour before this field existed): one scale per token over all ``K`` input
            features. ``G > 0``: one scale per token and group of ``G`` contiguous features;
            every quantized activation's ``K`` must be divisible by ``G`` (checked when the
            quantizers are inserted). Far more accurate on real models with massive-activation
            channels (SmolLM2-135M, full-precision weights, fake-quant A4, CPU: WikiText-2
            40 windows: perplexity 6,910 per token, 76.2 at G=64, 48.3 at G=32; fp 28.74; docs/results.md 4.3); the command line
            uses 64 for ``--activation-bits 4``. Only per-token scales (``0``) have int8 Triton
            kernels (:mod:`dbllm_compile.passes.int_activations`). Ignored while
            ``activation_bits=16`` (it then applies when quantizers are added later by
            :func:`dbllm_compile.add_activation_quant` / ``distill_w2a4``).
        rotation_block: ``0`` (default): no rotation. ``B`` (a power of two, e.g. 64): each
            quantized linear's input is rotated by a block-diagonal orthonormal Hadamard matrix
            ``Q`` with blocks of ``B`` features and its weight replaced by ``W @ Q`` before the
            initialisation (exact in full precision; :mod:`dbllm_compile.reference.rotation`).
            One ``dbllm.hadamard`` node per distinct input, shared by siblings, placed before the
            4-bit activation quantizer. Spreads outlier channels so 4-bit activations lose far
            less (fp weights, fake A4 with groups of 64: WikiText-2 perplexity 76.2 -> 34.7,
            docs/results.md 4.3); costs one small ``[M, K/B, B] @ [B, B]`` product per rotated
            activation. ``B`` must divide every quantized layer's ``in_features``.
        version: format version of this config; only :data:`CONFIG_VERSION` is accepted.

    Example:
        >>> cfg = DBLLMConfig(group_size=128, exclude=("*.mlp.down_proj",))
        >>> cfg.group_size
        128
    """

    group_size: int = 64
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_head: bool = True
    init: InitMethod = "mse"
    init_grid_points: int = 48
    init_refine_iters: int = 0
    scale_dtype: str = "float16"
    dynamic: bool = True
    activation_bits: int = 16
    codebook: Codebook = "binary"
    activation_group_size: int = 0
    rotation_block: int = 0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
                raise ConfigError(
                    f"DBLLMConfig.{name} must be a sequence of pattern strings, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
            for pattern in value:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise ConfigError(
                            f"DBLLMConfig.{name}: pattern {pattern!r} is not a valid regular expression "
                            f"({err}); write a glob such as 'model.layers.*.mlp.*' or fix the regex"
                        ) from None
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise ConfigError(
                f"DBLLMConfig.group_size must be a positive multiple of 8, got "
                f"{self.group_size!r}; common choices are 64 (default) and 128"
            )
        if self.init not in ("mse", "maxabs"):
            raise ConfigError(f"DBLLMConfig.init must be 'mse' or 'maxabs', got {self.init!r}")
        if not isinstance(self.init_grid_points, int) or self.init_grid_points < 2:
            raise ConfigError(
                f"DBLLMConfig.init_grid_points must be an int >= 2, got {self.init_grid_points!r}"
            )
        if not isinstance(self.init_refine_iters, int) or self.init_refine_iters < 0:
            raise ConfigError(
                f"DBLLMConfig.init_refine_iters must be an int >= 0, got {self.init_refine_iters!r}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"DBLLMConfig.scale_dtype must be one of {sorted(SCALE_DTYPES)}, "
                f"got {self.scale_dtype!r}"
            )
        if self.activation_bits not in ACTIVATION_BITS or isinstance(self.activation_bits, bool):
            raise ConfigError(
                f"DBLLMConfig.activation_bits must be one of {list(ACTIVATION_BITS)}, got "
                f"{self.activation_bits!r}; use 16 for full-precision activations or 4 for W(1+1)A4"
            )
        if (isinstance(self.activation_group_size, bool) or not isinstance(self.activation_group_size, int)
                or self.activation_group_size < 0):
            raise ConfigError(
                f"DBLLMConfig.activation_group_size must be an int >= 0, got {self.activation_group_size!r}; "
                f"use 0 for one activation scale per token or e.g. 64 for one per 64 input features"
            )
        from dbllm_compile.reference.rotation import check_rotation_block

        check_rotation_block(self.rotation_block, "DBLLMConfig.rotation_block")
        if self.codebook not in CODEBOOKS:
            raise ConfigError(
                f"DBLLMConfig.codebook must be one of {list(CODEBOOKS)}, got {self.codebook!r}; use "
                f"'binary' for DB-LLM's a1*b1 + a2*b2 or 'sign' for LBLLM's symmetric levels (+ offset c)"
            )
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"DBLLMConfig.version {self.version!r} is not supported by this dbllm_compile "
                f"(it reads version {CONFIG_VERSION}); upgrade dbllm_compile or re-create the config"
            )

    @property
    def scales_per_group(self) -> int:
        """Stored parameters per output channel and group: 2 (``a1, a2``), 3 with the offset ``c``."""
        return 3 if self.codebook == "sign" else 2

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """The scale storage dtype as a ``torch.dtype``."""
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists for tuples).

        Example:
            >>> DBLLMConfig.from_dict(DBLLMConfig().to_dict()) == DBLLMConfig()
            True
        """
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DBLLMConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error, missing ones take
        their defaults (a dict written before ``activation_bits``, ``codebook``,
        ``activation_group_size`` or ``rotation_block`` existed loads as ``16`` / ``"binary"`` / ``0``
        / ``0``, which is what it
        meant)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown DBLLMConfig field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)
