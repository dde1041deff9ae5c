"""``torch.ops.dbllm.db_gemv_pdl``: the batch-1 linear (or gated MLP) launched with PDL, an opaque op.

``db_gemv_pdl(x, qweight, scales, bias, in_features, group_size, glu) -> Tensor`` computes
``db_linear_gpu`` (``glu=False``) or ``db_glu_gpu`` (``glu=True``) on the same GPU-layout
weights, with the gemv kernel launched with programmatic dependent launch (PDL, Hopper or
later): its first weight tile is requested while the kernel before it still runs, and it lets
the kernel after it start launching before it ends (:mod:`.gemv`).

Why a second op: ``db_linear_gpu`` is a ``triton_op``, whose kernels Inductor launches itself,
and Inductor (torch 2.11) launches user-defined Triton kernels without the PDL attribute. This op
is a ``custom_op`` (opaque to Inductor): its CUDA implementation launches the kernel directly,
also inside CUDA-graph capture. PDL pays only when the kernels on both sides of each launch use
it (``benchmarks/bench_pdl.py``: 62.0 -> 58.4 us per Llama-2-7B layer with both, slower with
one side only), so the backend turns on Inductor's own PDL code (``triton.enable_pdl``) in the
graphs it rewrites to this op (:mod:`dbllm_compile.backends.dynamo.pdl`).

A configuration other than a gemv (a shape the tuner gave the tensor-core kernel), or
activations the gemv cannot read, run ``db_linear_gpu``'s kernels without PDL. On CPU it is the
torch reference of the two ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import gemv_applies, glu_gemv_applies, launch_gemv, run_config
from .prepared_op import checked_weights, glu_config, rows, runs_kernels
from .tuning import choose

__all__ = ["db_gemv_pdl", "PDL_OP"]


@torch.library.custom_op("dbllm::db_gemv_pdl", mutates_args=())
def db_gemv_pdl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    glu: bool,
) -> torch.Tensor:
    """``db_glu_gpu(...)`` if ``glu`` else ``db_linear_gpu(...)``, gemv launched with PDL (module docstring)."""
    if not runs_kernels(x, scales, group_size):  # the torch reference of the op it stands for
        gpu = torch.ops.dbllm.db_glu_gpu if glu else torch.ops.dbllm.db_linear_gpu
        return gpu(x, qweight, scales, bias, in_features, group_size)
    gw = checked_weights("db_gemv_pdl", x, qweight, scales, in_features, group_size)
    n = qweight.shape[0]
    x2 = rows(x, in_features)
    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)
    cfg = choose(x2, gw, bias)  # (real tensors here: an opaque op never runs on fake ones)
    if glu:
        cfg = glu_config(cfg)
    if cfg.kind in ("gemv", "gemvc") and (glu_gemv_applies(x2, gw, cfg) if glu else gemv_applies(x2)):
        z = launch_gemv(x2, gw, bias, cfg, glu=glu, pdl=True)
    else:
        y = run_config(x2, gw, bias, cfg)
        z = F.silu(y[:, :n // 2]) * y[:, n // 2:] if glu else y
    return z.reshape(*x.shape[:-1], z.shape[-1])


@db_gemv_pdl.register_fake
def _fake(x, qweight, scales, bias, in_features, group_size, glu):
    n = qweight.shape[0]
    return x.new_empty(*x.shape[:-1], n // 2 if glu else n)


PDL_OP = torch.ops.dbllm.db_gemv_pdl.default
