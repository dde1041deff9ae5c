"""Launchers: check constraints, allocate the output, launch one kernel with one configuration.

A configuration is a :class:`KernelConfig`; which one runs is decided by :mod:`.dispatch`
(tuned, cached on disk by :mod:`.tuning`). Launchers never synchronise and allocate nothing but
their outputs (and, on the ``dequant`` path, the dense weight), so they are safe inside CUDA
graph capture.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .layout import K_ALIGN, GpuWeights

__all__ = ["KernelConfig", "interpreted", "launch_matmul", "launch_dequant", "run_config", "config_fits"]


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

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "KernelConfig":
        return KernelConfig(**d)

    def short(self) -> str:
        if self.kind == "dequant":
            chunk = f"c{self.chunk_n}" if self.chunk_n else ""
            return f"dequant{self.block_n}x{self.block_k}w{self.num_warps}{chunk}+cublas"
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}g{self.group_tiles}"
                f"w{self.num_warps}s{self.num_stages}" + ("x" if self.swap else ""))


def config_fits(cfg: KernelConfig, group_size: int) -> bool:
    """Whether ``cfg`` is valid for this group size (BLOCK_K a multiple of G dividing 1024)."""
    return cfg.block_k % group_size == 0 and K_ALIGN % cfg.block_k == 0


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


def launch_matmul(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None, cfg: KernelConfig,
                  wrap: bool = False) -> torch.Tensor:
    """``x2 [M, K] -> [M, N]`` with the fused kernel; ``x2`` must have unit stride along K.

    ``wrap=True`` launches through ``torch.library.wrap_triton`` (inside a ``triton_op``).
    """
    from .kernels import db_matmul_kernel

    _check_x(x2, gw)
    if not config_fits(cfg, gw.group_size):
        raise ValueError(f"db_linear (triton): config {cfg.short()} does not fit group_size={gw.group_size}")
    m, k = x2.shape
    n = gw.out_features
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)
    grid = (triton_cdiv(n, cfg.block_n) * triton_cdiv(m, cfg.block_m),)
    _kernel(db_matmul_kernel, wrap)[grid](
        x2, gw.qweight, gw.scales, bias if bias is not None else gw.scales, out,
        m, n, k,
        x2.stride(0), gw.qweight.stride(0), gw.scales.stride(0), out.stride(0),
        GROUP=gw.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_TILES=cfg.group_tiles, SWAP=cfg.swap, EVEN_K=(k % cfg.block_k == 0),
        HAS_BIAS=bias is not None, IS_BF16=(x2.dtype == torch.bfloat16), USE_ASM=not interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def launch_dequant(gw: GpuWeights, dtype: torch.dtype, cfg: KernelConfig | None = None,
                   wrap: bool = False) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (must be the dtype the scales were prepared for)."""
    from .kernels import db_dequant_kernel

    cfg = cfg or KernelConfig(kind="dequant", block_n=32, block_k=512, num_warps=4)
    if dtype != gw.scales.dtype:
        raise TypeError(f"db_linear (triton): dequantize to {dtype} needs scales prepared for it, got {gw.scales.dtype}")
    n, k = gw.out_features, gw.in_features
    bk = max(cfg.block_k, gw.group_size)
    w = torch.empty(n, k, dtype=dtype, device=gw.qweight.device)
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
    return launch_matmul(x2, gw, bias, cfg, wrap)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
