"""Launchers: check constraints, allocate the output, launch the kernels of one configuration.

A configuration is a :class:`KernelConfig`; which one runs is decided by :mod:`.dispatch`
(tuned, cached on disk by :mod:`.tuning`). Launchers never synchronise and allocate nothing but
their outputs (plus the dense weight on the ``dequant`` path and the float32 partials of a
split-K launch, all with ``torch.empty``), so they are safe inside CUDA graph capture.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .layout import K_ALIGN, GpuWeights

__all__ = ["KernelConfig", "interpreted", "launch_matmul", "launch_gemv", "gemv_applies", "glu_gemv_applies", "launch_dequant", "run_config", "config_fits",
           "check_config"]


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """One way to run the linear.

    ``kind="fused"``: :func:`~.kernels.db_matmul_kernel` with these block sizes.
    ``kind="dequant"``: :func:`~.kernels.db_dequant_kernel` (``block_n x block_k`` tiles) into a
    dense weight, then ``F.linear`` (cuBLAS); ``block_m``/``group_tiles``/``num_stages`` unused.
    ``chunk_n > 0`` does it ``chunk_n`` output rows at a time (dense chunk sized to stay in L2
    until cuBLAS reads it; each chunk's product is written straight into a column slice of the
    output, which cuBLAS takes with leading dimension N, no copy).
    ``kind="gemv"``: :func:`~.gemv.db_gemv_kernel` (batch 1, fp16, no tensor cores) with
    ``block_n x block_k`` tiles; ``block_m``/``group_tiles``/``swap``/``chunk_n`` unused. For
    other dtypes, odd K or unaligned rows of x it runs the fused kernel's untuned default.
    ``kind="mma"``: :func:`~.mma16.db_mma16_kernel` (2-16 rows of fp16 x, ``mma.sync`` in inline
    PTX) with ``block_n`` weight rows per program (``16 * tiles * num_warps``) and chunks of
    ``block_k`` features (64, 128 or 256); other activations run the fused kernel's default.
    ``split_k > 1`` (fused, gemv and mma): K is cut into up to ``split_k`` ranges of whole ``block_k``
    tiles, one program per output tile and range, float32 partials summed by a second kernel
    (:mod:`.splitk`). ``1`` is the single-kernel path.

    Names (:meth:`short`, :meth:`parse`): ``m16n64k256g1w4s4`` (``m`` block_m, ``n`` block_n,
    ``k`` block_k, ``g`` group_tiles, ``w`` num_warps, ``s`` num_stages), ``x`` appended for
    ``swap``, ``sk4`` for ``split_k=4``; ``dequant32x512w4c1024+cublas`` for the dequant kind, ``gemv64x256w4s4sk2`` for gemv,
    ``mma128x128w4sk2`` for mma.
    """

    kind: str = "fused"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 512
    group_tiles: int = 1
    swap: bool = False
    chunk_n: int = 0
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self):
        if self.kind not in ("fused", "dequant", "gemv", "gemvc", "mma"):
            raise ValueError(f"kernel config {self.short()}: kind must be 'fused', 'dequant', 'gemv', 'gemvc' or "
                             f"'mma', got {self.kind!r}")
        if self.kind == "mma" and (self.block_k not in (64, 128, 256) or self.block_n % (16 * self.num_warps)):
            raise ValueError(f"kernel config {self.short()}: an mma config needs block_k 64, 128 or 256 and block_n a "
                             f"multiple of 16 * num_warps = {16 * self.num_warps}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"kernel config {self.short()}: split_k must be an int >= 1 (1 = no split), "
                             f"got {self.split_k!r}")
        if self.split_k > 1 and self.kind == "dequant":
            raise ValueError(f"kernel config {self.short()}: split_k={self.split_k} applies to the fused and gemv "
                             "kernels only; use split_k=1 with kind='dequant'")

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "KernelConfig":
        """Inverse of :meth:`to_json`; a missing ``split_k`` (entries written before split-K) is 1."""
        unknown = set(d) - {f.name for f in fields(KernelConfig)}
        if unknown:
            raise ValueError(f"kernel config {d}: unknown fields {sorted(unknown)} (written by a newer version?)")
        return KernelConfig(**d)

    def short(self) -> str:
        if self.kind == "dequant":
            chunk = f"c{self.chunk_n}" if self.chunk_n else ""
            return f"dequant{self.block_n}x{self.block_k}w{self.num_warps}{chunk}+cublas"
        split = f"sk{self.split_k}" if self.split_k != 1 else ""
        if self.kind == "mma":
            return f"mma{self.block_n}x{self.block_k}w{self.num_warps}" + split
        if self.kind in ("gemv", "gemvc"):
            return f"{self.kind}{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}" + split
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}g{self.group_tiles}"
                f"w{self.num_warps}s{self.num_stages}" + ("x" if self.swap else "") + split)

    @staticmethod
    def parse(name: str) -> "KernelConfig":
        """The configuration named ``name`` (:meth:`short`'s format; names without ``sk`` have ``split_k=1``)."""
        m = _FUSED_NAME.fullmatch(name)
        if m:
            bm, bn, bk, gt, w, st, swap, sk = m.groups()
            return KernelConfig(block_m=int(bm), block_n=int(bn), block_k=int(bk), group_tiles=int(gt),
                                swap=bool(swap), num_warps=int(w), num_stages=int(st), split_k=int(sk or 1))
        m = _GEMV_NAME.fullmatch(name)
        if m:
            kind, bn, bk, w, st, sk = m.groups()
            return KernelConfig(kind=kind, block_n=int(bn), block_k=int(bk), num_warps=int(w),
                                num_stages=int(st), split_k=int(sk or 1))
        m = _MMA_NAME.fullmatch(name)
        if m:
            bn, bk, w, sk = m.groups()
            return KernelConfig(kind="mma", block_n=int(bn), block_k=int(bk), num_warps=int(w), split_k=int(sk or 1))
        m = _DEQUANT_NAME.fullmatch(name)
        if m:
            bn, bk, w, chunk = m.groups()
            return KernelConfig(kind="dequant", block_n=int(bn), block_k=int(bk), num_warps=int(w),
                                chunk_n=int(chunk or 0))
        raise ValueError(f"not a kernel config name: {name!r} (expected e.g. 'm16n64k256g1w4s4', "
                         "'m16n64k256g1w4s4sk4', 'gemv64x256w4s4' or 'dequant32x512w4+cublas')")


_FUSED_NAME = re.compile(r"m(\d+)n(\d+)k(\d+)g(\d+)w(\d+)s(\d+)(x?)(?:sk(\d+))?")
_GEMV_NAME = re.compile(r"(gemvc?)(\d+)x(\d+)w(\d+)s(\d+)(?:sk(\d+))?")
_MMA_NAME = re.compile(r"mma(\d+)x(\d+)w(\d+)(?:sk(\d+))?")
_DEQUANT_NAME = re.compile(r"dequant(\d+)x(\d+)w(\d+)(?:c(\d+))?\+cublas")


def config_fits(cfg: KernelConfig, group_size: int) -> bool:
    """Whether ``cfg`` is valid for this group size: BLOCK_K a multiple of G dividing 1024, or
    for the gemv also a multiple of 1024 (a power of two), for K a multiple of it only
    (:func:`launch_gemv` checks); for mma, G a multiple of ``block_k / 4`` (a lane's words share a group)."""
    if cfg.kind == "mma":
        return group_size % (cfg.block_k // 4) == 0
    if cfg.block_k % group_size:
        return False
    if cfg.kind in ("gemv", "gemvc") and cfg.block_k % K_ALIGN == 0:
        return cfg.block_k & (cfg.block_k - 1) == 0
    return K_ALIGN % cfg.block_k == 0


def check_config(cfg: KernelConfig, group_size: int) -> None:
    """Raise a ``ValueError`` naming ``cfg`` and the fix when it cannot run with this group size."""
    if not config_fits(cfg, group_size):
        if cfg.kind == "mma":
            raise ValueError(f"db_linear (triton): config {cfg.short()} needs group_size={group_size} to be a multiple "
                             f"of block_k / 4 = {cfg.block_k // 4}; use block_k <= {4 * group_size}")
        fits = [b for b in (16, 32, 64, 128, 256, 512, 1024) if b % group_size == 0]
        raise ValueError(
            f"db_linear (triton): config {cfg.short()} has block_k={cfg.block_k}, which must be a multiple of "
            f"group_size={group_size} dividing {K_ALIGN}; use block_k in {fits}"
        )


def _check_x(x2: torch.Tensor, gw: GpuWeights) -> None:
    if x2.dtype != gw.scales.dtype:
        raise TypeError(
            f"db_linear (triton): activations are {x2.dtype} but the GPU weights were prepared for "
            f"{gw.scales.dtype}; prepare them with dtype={x2.dtype}"
        )
    if x2.shape[-1] != gw.in_features:
        raise ValueError(f"db_linear (triton): x has {x2.shape[-1]} features, layer expects {gw.in_features}")


def _kernel(fn, wrap: bool):
    return torch.library.wrap_triton(fn) if wrap else fn


def _output(x2: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked (``[M, N]``, ``x2``'s dtype, unit stride along N), or a new one."""
    m = x2.shape[0]
    if out is None:
        return torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if out.shape != (m, n) or out.dtype != x2.dtype or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"db_linear (triton): out must be [{m}, {n}] {x2.dtype} with unit stride along N, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out


def _split_target(x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, cfg: KernelConfig):
    """``(bias in x2's dtype, tiles per split, splits, where the kernel writes)``: ``out`` for one
    split, else a float32 workspace ``[splits, M, N]`` for :func:`.splitk.launch_reduce`."""
    from .splitk import split_plan

    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)
    per_split, splits = split_plan(x2.shape[1], cfg.block_k, cfg.split_k)
    m, n = out.shape
    dst = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x2.device)
    return bias, per_split, splits, dst


def launch_matmul(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, cfg: KernelConfig,
                  wrap: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 [M, K] -> [M, N]`` with the fused kernel; ``x2`` must have unit stride along K.

    ``wrap=True`` launches through ``torch.library.wrap_triton`` (inside a ``triton_op``).
    ``out``: an ``[M, N]`` tensor of ``x2``'s dtype with unit stride along N to write into (any
    row stride, e.g. a column slice of a wider buffer); allocated when ``None``.
    ``cfg.split_k > 1``: the K plan of :func:`.splitk.split_plan`; with more than one split the
    partials go to a float32 workspace ``[splits, M, N]`` and the reduce kernel writes ``out``.
    """
    from .kernels import db_matmul_kernel
    from .splitk import launch_reduce

    _check_x(x2, gw)
    if cfg.kind != "fused":
        raise ValueError(f"db_linear (triton): launch_matmul runs fused configs, got {cfg.short()}; use run_config")
    check_config(cfg, gw.group_size)
    m, k = x2.shape
    n = gw.out_features
    out = _output(x2, n, out)
    if m == 0:
        return out
    bias, per_split, splits, dst = _split_target(x2, bias, out, cfg)
    tiles = triton_cdiv(n, cfg.block_n) * triton_cdiv(m, cfg.block_m)
    grid = (tiles,) if splits == 1 else (tiles, splits)
    _kernel(db_matmul_kernel, wrap)[grid](
        x2, gw.qweight, gw.scales, bias if bias is not None else gw.scales, dst,
        m, n, k, per_split if splits > 1 else 1,  # a constant on the single path: one specialisation
        x2.stride(0), gw.qweight.stride(0), gw.scales.stride(0), dst.stride(-2),
        GROUP=gw.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_TILES=cfg.group_tiles, SWAP=cfg.swap, EVEN_K=(k % cfg.block_k == 0),
        HAS_BIAS=bias is not None and splits == 1, IS_BF16=(x2.dtype == torch.bfloat16),
        USE_ASM=not interpreted(), SPLIT_K=1 if splits == 1 else cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        launch_reduce(dst, bias, out, wrap)
    return out


def gemv_applies(x2: torch.Tensor) -> bool:
    """Whether the gemv kernel can read ``x2 [M, K]``: fp16, even K, rows 4-byte aligned, unit stride."""
    k = x2.shape[-1]
    return (x2.dtype == torch.float16 and k % 2 == 0 and x2.stride(-1) == 1
            and (x2.shape[0] <= 1 or x2.stride(0) % 2 == 0) and x2.storage_offset() % 2 == 0)  # storage: 4-byte aligned


def launch_gemv(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, cfg: KernelConfig,
                wrap: bool = False, out: torch.Tensor | None = None, glu: bool = False,
                pdl: bool | None = None, variant: dict | None = None) -> torch.Tensor:
    """``x2 [M, K] -> [M, N]`` with :func:`~.gemv.db_gemv_kernel` (one grid row per row of x).

    Activations the kernel cannot read (:func:`gemv_applies`: bf16, odd K, unaligned rows) run
    the fused kernel's untuned default instead, so a cached gemv choice never fails a call.

    ``glu=True``: the rows of ``gw`` are ``[gate; up]`` (``N = 2H``) and the result is
    ``silu(x2 @ gate.T + b_gate) * (x2 @ up.T + b_up)``, ``[M, H]``, in the kernel's epilogue
    (float32 before the one rounding). Needs a gemv-readable ``x2``, ``cfg.split_k == 1`` and
    ``cfg.block_n >= 2`` (:func:`glu_gemv_applies`); a ``ValueError`` otherwise.

    ``pdl``: launch with programmatic dependent launch where the kernel supports it (``LOADS=2``,
    Hopper or later; :mod:`.gemv`); ``None`` follows ``DBLLM_GEMV_PDL``. Not through
    ``wrap_triton``: Inductor launches user kernels without the launch attribute.
    """
    from .gemv import db_gemv_kernel
    from .splitk import launch_reduce
    from .tuning import default_config

    _check_x(x2, gw)
    if cfg.kind not in ("gemv", "gemvc"):
        raise ValueError(f"db_linear (triton): launch_gemv runs gemv configs, got {cfg.short()}; use run_config")
    check_config(cfg, gw.group_size)
    m, k = x2.shape
    n = gw.out_features
    if glu and not glu_gemv_applies(x2, gw, cfg):
        raise ValueError(f"db_linear (triton): the GLU gemv needs fp16 x with even K and aligned rows, "
                         f"an even number of weight rows, split_k=1 and block_n >= 2; got x {x2.dtype} "
                         f"{tuple(x2.shape)}, N={n}, config {cfg.short()}")
    if m == 1 and x2.stride(0) % 2:
        x2 = x2.as_strided((1, k), (k, 1))  # the row stride of a single row is never used
    if cfg.kind == "gemvc" and chunk_loads_apply(x2.view(torch.int32) if gemv_applies(x2) else None, k):
        return _launch_gemv_chunk(x2, gw, bias, cfg, wrap, out, glu, pdl, **(variant or {}))
    if cfg.kind == "gemvc":  # x its asm loads cannot read: the word gemv, in tiles it takes for any K
        cfg = dataclasses.replace(cfg, kind="gemv", block_k=min(cfg.block_k, K_ALIGN))
    if cfg.block_k > K_ALIGN and k % cfg.block_k:  # a partial tile that wide would read past the layout's padding
        raise ValueError(f"db_linear (triton): config {cfg.short()} needs K to be a multiple of {cfg.block_k}, "
                         f"got K={k}; use a block_k of at most {K_ALIGN}")
    if not glu and not gemv_applies(x2):
        return launch_matmul(x2, gw, bias, default_config(m, n, k, gw.group_size), wrap, out)
    out = _output(x2, n // 2 if glu else n, out)
    if m == 0:
        return out
    bias, per_split, splits, dst = _split_target(x2, bias, out, cfg)
    xp = x2.view(torch.int32)  # fp16 pairs
    loads = _gemv_loads(xp, m, k, cfg)
    programs = triton_cdiv(n // 2, cfg.block_n // 2) if glu else triton_cdiv(n, cfg.block_n)
    _kernel(db_gemv_kernel, wrap)[(programs, splits, m)](
        xp, gw.qweight, gw.scales, bias if bias is not None else gw.scales, dst,
        m, n, k, per_split if splits > 1 else 1,
        xp.stride(0) if m > 1 else 0, gw.qweight.stride(0), gw.scales.stride(0), dst.stride(-2),
        GROUP=gw.group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=(k % cfg.block_k == 0),
        HAS_BIAS=bias is not None and splits == 1, USE_ASM=not interpreted(),
        SPLIT_K=1 if splits == 1 else cfg.split_k, LOADS=loads, GLU=glu,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_gemv_pdl(loads, pdl),
    )
    if splits > 1:
        launch_reduce(dst, bias, out, wrap)
    return out


def chunk_loads_apply(xp: torch.Tensor | None, k: int) -> bool:
    """Whether the chunk gemv (:mod:`.gemv_chunk`) runs on these fp16 pairs ``xp`` (``None``: x the
    gemv cannot read): its asm loads need K a multiple of 16 and 16-byte aligned rows (as the
    word gemv's ``LOADS=2``); the interpreter runs its plain-load path. Otherwise the word gemv runs."""
    if xp is None or k % 16:
        return False
    if interpreted():
        return True
    return xp.storage_offset() % 4 == 0 and (xp.shape[0] == 1 or xp.stride(0) % 4 == 0)


def _launch_gemv_chunk(x2, gw, bias, cfg, wrap, out, glu, pdl, sum16: int = 1, prefetch_x: bool = False,
                       maxnreg: int | None = None):
    """:func:`launch_gemv` with :func:`~.gemv_chunk.db_gemv_chunk_kernel` (``cfg.kind == "gemvc"``).

    ``sum16`` / ``prefetch_x``: the kernel's ``SUM16`` / ``PREFETCH_X``; ``maxnreg``: a register
    cap per thread (``launch_gemv``'s ``variant``, for sweeps); the defaults are the swept choice
    (kernels.md).
    """
    from .gemv_chunk import db_gemv_chunk_kernel
    from .splitk import launch_reduce

    m, k = x2.shape
    n = gw.out_features
    out = _output(x2, n // 2 if glu else n, out)
    if m == 0:
        return out
    bias, per_split, splits, dst = _split_target(x2, bias, out, cfg)
    xp = x2.view(torch.int32)
    programs = triton_cdiv(n // 2, cfg.block_n // 2) if glu else triton_cdiv(n, cfg.block_n)
    _kernel(db_gemv_chunk_kernel, wrap)[(programs, splits, m)](
        xp, gw.qweight, gw.scales, bias if bias is not None else gw.scales, dst,
        m, n, k, per_split if splits > 1 else 1,
        xp.stride(0) if m > 1 else 0, gw.qweight.stride(0), gw.scales.stride(0), dst.stride(-2),
        GROUP=gw.group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=(k % cfg.block_k == 0),
        HAS_BIAS=bias is not None and splits == 1, USE_ASM=not interpreted(),
        SPLIT_K=1 if splits == 1 else cfg.split_k, GLU=glu, SUM16=sum16, PREFETCH_X=prefetch_x,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_gemv_pdl(0 if interpreted() else 2, pdl),
        **({"maxnreg": maxnreg} if maxnreg and not interpreted() else {}),
    )
    if splits > 1:
        launch_reduce(dst, bias, out, wrap)
    return out


def glu_gemv_applies(x2: torch.Tensor, gw: GpuWeights, cfg: KernelConfig) -> bool:
    """Whether :func:`launch_gemv` with ``glu=True`` runs ``cfg`` on ``x2``: a gemv configuration
    without split-K, at least two rows per program, an even number of weight rows, and ``x2``
    readable by the gemv (:func:`gemv_applies`)."""
    return (cfg.kind in ("gemv", "gemvc") and cfg.split_k == 1 and cfg.block_n >= 2 and gw.out_features % 2 == 0
            and gemv_applies(x2))


def _gemv_pdl(loads: int, pdl: bool | None = None) -> dict:
    """``PDL`` and ``launch_pdl`` of a gemv launch: programmatic dependent launch when ``pdl``
    (``None``: when ``DBLLM_GEMV_PDL=1``), with ``LOADS=2`` on Hopper or later (see :mod:`.gemv`)."""
    if pdl is None:
        raw = os.environ.get("DBLLM_GEMV_PDL", "0")
        if raw not in ("0", "1"):
            raise ValueError(f"DBLLM_GEMV_PDL must be 0 or 1, got {raw!r}; unset it for the default (0)")
        pdl = raw == "1"
    if not pdl or loads != 2 or torch.cuda.get_device_capability()[0] < 9:
        return {"PDL": False}  # passed explicitly: wrap_triton's mutation analysis wants every argument
    return {"PDL": True, "launch_pdl": True}


def _gemv_loads(xp: torch.Tensor, m: int, k: int, cfg: KernelConfig) -> int:
    """How the gemv loads its operands (``db_gemv_kernel``'s ``LOADS``; see :mod:`.gemv`).

    2 (every load in inline asm) or 1 (x only) need inline asm (not the interpreter), K a
    multiple of 16 (2) or of the tile (1), and 16-byte aligned rows of x: the storage offset
    (in int32 pairs) and, with several rows, the row stride multiples of 4 pairs (the
    allocation itself is at least 256-byte aligned). ``DBLLM_GEMV_LOADS`` (default 2) picks a
    lower mode, for before/after timings.
    """
    raw = os.environ.get("DBLLM_GEMV_LOADS", "2")
    if raw not in ("0", "1", "2"):
        raise ValueError(f"DBLLM_GEMV_LOADS must be 0, 1 or 2, got {raw!r}; unset it for the default (2)")
    want = int(raw)
    if want == 0 or interpreted() or (k % cfg.block_k and (want == 1 or k % 16)):
        return 0
    return want if xp.storage_offset() % 4 == 0 and (m == 1 or xp.stride(0) % 4 == 0) else 0


def launch_dequant(gw: GpuWeights, dtype: torch.dtype, cfg: KernelConfig | None = None,
                   wrap: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (must be the dtype the scales were prepared for),
    written into ``out`` (``[N, K]``, unit stride along K, any row stride) when given."""
    from .kernels import db_dequant_kernel

    cfg = cfg or KernelConfig(kind="dequant", block_n=32, block_k=512, num_warps=4)
    if dtype != gw.scales.dtype:
        raise TypeError(f"db_linear (triton): dequantize to {dtype} needs scales prepared for it, got {gw.scales.dtype}")
    n, k = gw.out_features, gw.in_features
    bk = max(cfg.block_k, gw.group_size)
    if out is not None and (out.shape != (n, k) or out.dtype != dtype or (k > 1 and out.stride(1) != 1)):
        raise ValueError(f"db_linear (triton): dequantize needs out [{n}, {k}] {dtype} with unit stride along K, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    w = torch.empty(n, k, dtype=dtype, device=gw.qweight.device) if out is None else out
    grid = (triton_cdiv(n, cfg.block_n), triton_cdiv(k, bk))
    _kernel(db_dequant_kernel, wrap)[grid](
        gw.qweight, gw.scales, w, n, k, gw.qweight.stride(0), gw.scales.stride(0), w.stride(0),
        GROUP=gw.group_size, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        IS_BF16=(dtype == torch.bfloat16), USE_ASM=not interpreted(), num_warps=cfg.num_warps,
    )
    return w


def run_config(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, cfg: KernelConfig,
               wrap: bool = False) -> torch.Tensor:
    """Run the linear on ``x2 [M, K]`` with ``cfg`` (either kind)."""
    if cfg.kind == "dequant":
        _check_x(x2, gw)
        b = None if bias is None else bias.to(x2.dtype)
        n = gw.out_features
        if not cfg.chunk_n or n <= cfg.chunk_n:
            return F.linear(x2, launch_dequant(gw, x2.dtype, cfg, wrap), b)
        out = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
        for r0 in range(0, n, cfg.chunk_n):
            r1 = min(n, r0 + cfg.chunk_n)
            part = GpuWeights(gw.qweight[r0:r1], gw.scales[r0:r1], gw.in_features, gw.group_size)
            w = launch_dequant(part, x2.dtype, cfg, wrap)
            if b is None:
                torch.mm(x2, w.t(), out=out[:, r0:r1])
            else:
                torch.addmm(b[r0:r1], x2, w.t(), out=out[:, r0:r1])
        return out
    if cfg.kind in ("gemv", "gemvc"):
        return launch_gemv(x2, gw, bias, cfg, wrap)
    if cfg.kind == "mma":
        from .mma16 import launch_mma16

        return launch_mma16(x2, gw, bias, cfg, wrap)
    return launch_matmul(x2, gw, bias, cfg, wrap)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
