"""Triton kernels of the packed dual-binary linear (installed as ``dbllm_compile.backends.triton``).

- :mod:`.layout`: the GPU layout (2-bit codes in lane-quad order, interleaved scales) and the
  repack from the reference layout; documented there and in ``docs/kernels.md``.
- :mod:`.kernels`: the Triton kernels (fused decode/GEMM, dequantize-to-dense).
- :mod:`.gemv` / :mod:`.gemv_chunk`: batch-1 kernels on the CUDA cores (word and chunk gemv).
- :mod:`.mma16`: 2-16 rows of x, the chunk gemv's loads with ``mma.sync`` products (inline PTX).
- :mod:`.launch`: one configuration, one launch.
- :mod:`.splitk`: split-K for decode (K plan, reduce kernel, default split heuristic).
- :mod:`.tuning`: configuration choice per shape, cached on disk per GPU model.
- :mod:`.dispatch`: the CUDA implementation of ``torch.ops.dbllm.db_linear`` (weight cache).
- :mod:`.prepared_op`: ``torch.ops.dbllm.db_linear_gpu``, a ``triton_op`` on prepared weights,
  and ``torch.ops.dbllm.db_glu_gpu`` (a gated MLP's ``silu(gate) * up`` in the gemv epilogue).
- :mod:`.pdl_op`: ``torch.ops.dbllm.db_gemv_pdl``, the batch-1 gemv launched with PDL (opaque op).
- :mod:`.decode_attention`: ``torch.ops.dbllm.decode_attention``, one query token against a KV
  cache (split-KV Triton kernel), used by :mod:`dbllm_compile.attention` for decode steps.
- :mod:`.a4` / :mod:`.int_dispatch`: 4-bit activations: the quantization kernel and the int8
  GEMMs, and the CUDA implementations of ``dbllm::act_quant_int`` / ``dbllm::db_linear_a4``;
  :mod:`.a4_reference` (level modes ``exact``/``group``/``row``, float64 references, no Triton)
  and :mod:`.a4_dense` (``levels="row"`` as decode to int8 + ``torch._int_mm``).

Importing this package imports Triton; :func:`register` installs the CUDA kernel of
``dbllm::db_linear`` (called by :mod:`dbllm_compile.backends` when Triton is importable).

Example::

    import torch, dbllm_compile
    from dbllm_compile.backends import triton as dbt
    dbt.register()
    y = torch.ops.dbllm.db_linear(x_cuda_fp16, packed, a1, a2, bias, K, 64)   # Triton kernels
    gw = dbt.to_gpu_layout(packed, a1, a2, K, 64, torch.float16)            # prepare once
    y = torch.ops.dbllm.db_linear_gpu(x_cuda_fp16, gw.qweight, gw.scales, bias, K, 64)
"""

from __future__ import annotations

from .dispatch import cache_size, clear_cache, db_linear_cuda, prepare_cached
from .launch import KernelConfig, run_config
from .layout import GpuWeights, dequantize_gpu_layout, from_gpu_layout, to_gpu_layout

__all__ = [
    "GpuWeights",
    "KernelConfig",
    "cache_size",
    "clear_cache",
    "db_linear_cuda",
    "dequantize_gpu_layout",
    "from_gpu_layout",
    "prepare_cached",
    "register",
    "run_config",
    "to_gpu_layout",
]

_registered = False


def register() -> None:
    """Make the Triton kernels the CUDA implementation of ``dbllm::db_linear`` and define
    ``dbllm::db_linear_gpu``. Idempotent."""
    global _registered
    if _registered:
        return
    from dbllm_compile import ops

    from . import decode_attention, pdl_op, prepared_op  # noqa: F401  (define dbllm::db_linear_gpu, ...)

    ops.db_linear.register_kernel("cuda")(db_linear_cuda)
    from dbllm_compile import ops_int

    from .int_dispatch import act_quant_int_cuda, db_linear_a4_cuda

    ops_int.act_quant_int.register_kernel("cuda")(act_quant_int_cuda)
    ops_int.db_linear_a4.register_kernel("cuda")(db_linear_a4_cuda)
    _registered = True
