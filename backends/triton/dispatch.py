"""The CUDA implementation of ``torch.ops.dbllm.db_linear``: weight cache + kernel choice.

``db_linear_cuda`` is registered with ``db_linear.register_kernel("cuda")`` by
:func:`dbllm_compile.backends.triton.register`. Per call it

1. finds the layer's weights in the GPU layout in a process-wide cache, keyed by the identity
   and version counter of ``packed``, ``a1``, ``a2`` and the activation dtype (held through weak
   references: an entry dies with its tensors, an in-place update of them re-prepares). The
   first call of a layer pays the repack (:func:`.layout.to_gpu_layout`, plain torch ops);
   the cache holds a second copy of the quantized weights (2 bits + scales per weight);
2. picks a configuration by ``M`` bucket and shape (:mod:`.tuning`: cached on disk, tuned on
   the first eager call of a new shape);
3. launches it. No host synchronisation and no allocation but the output (and, on the
   ``dequant`` path, the dense weight; with split-K, the float32 partials) once the layer is
   prepared and the shape tuned, so CUDA graphs capture it; run one eager call per layer and
   shape before capturing.

Falls back to the reference (dequantize + ``F.linear``, on the GPU) for what the kernels do not
cover: activations other than fp16/bf16, group sizes that are not a multiple of 16 dividing 1024,
and a missing Triton.

Sign codebook (the optional last argument ``c``, ``[N, n_groups]``): the kernels compute
``x @ (a1*b1 + a2*b2).T + bias`` and know nothing of ``c``; the offset's share is added outside
them, :func:`~dbllm_compile.reference.linear.add_offset_term`:

    y = (y_kernel.float() + x_sums @ c.float().T).to(y_kernel.dtype)
    x_sums[m, g] = sum of x[m, k] over the real features k of group g   (float32, [M, n_groups])

Padded features (``K < K_pad``) have bits 0 and no ``x``: zero-padding ``x`` before the group
sum counts exactly the real ones. Cost: one [M, K] reduction and one [M, n_groups] x
[n_groups, N] matmul (1/G of the main one) per call, in plain torch ops.
"""

from __future__ import annotations

import torch

from dbllm_compile.reference.linear import add_offset_term, db_linear_packed_reference
from dbllm_compile.tensor_cache import TensorCache

from .layout import GpuWeights, supports_group_size, to_gpu_layout

__all__ = ["db_linear_cuda", "kernel_with_offset", "prepare_cached", "clear_cache", "cache_size", "kernel_supported"]

_cache = TensorCache()


def kernel_supported(x: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernels handle these activations and group size."""
    return x.dtype in (torch.float16, torch.bfloat16) and supports_group_size(group_size)


def prepare_cached(packed: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, in_features: int,
                   group_size: int, dtype: torch.dtype) -> GpuWeights:
    """The GPU-layout weights of this layer for ``dtype``, repacked on first use (see module doc)."""
    gw = _cache.get((packed, a1, a2), dtype)
    if gw is not None:
        return gw
    if torch.cuda.is_available() and packed.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"db_linear (triton): layer with packed weight {tuple(packed.shape)} is first used inside "
            "CUDA graph capture; run one eager forward pass before capturing (the weight repack "
            "allocates memory that must outlive the graph)"
        )
    return _cache.put((packed, a1, a2), to_gpu_layout(packed, a1, a2, in_features, group_size, dtype), dtype)


def clear_cache() -> None:
    """Drop every prepared weight (the next call of each layer repacks)."""
    _cache.clear()


def cache_size() -> int:
    """Number of prepared layers held."""
    return len(_cache)


def linear_prepared(x: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` with GPU-layout weights, the configuration chosen by :mod:`.tuning`."""
    from .launch import run_config
    from .tuning import choose

    k = gw.in_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8 != 0):
        x2 = x2.contiguous()
    cfg = choose(x2, gw, bias)
    y = run_config(x2, gw, bias, cfg)
    return y.reshape(*x.shape[:-1], gw.out_features)


def db_linear_cuda(x: torch.Tensor, packed: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor,
                   bias: torch.Tensor | None, in_features: int, group_size: int,
                   c: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA kernel of ``dbllm::db_linear`` (same semantics as the reference; see module doc)."""
    if not kernel_supported(x, group_size):
        return db_linear_packed_reference(x, packed, a1, a2, bias, in_features, group_size, c)
    gw = prepare_cached(packed, a1, a2, in_features, group_size, x.dtype)
    return kernel_with_offset(lambda: linear_prepared(x, gw, bias), x, c, in_features, group_size)


def kernel_with_offset(kernel, x: torch.Tensor, c: torch.Tensor | None, in_features: int,
                       group_size: int) -> torch.Tensor:
    """``kernel()`` (the ``a1*b1 + a2*b2`` linear, bias included), plus the offset term when
    ``c`` is given (module docstring). Pure torch around the kernel: tested on CPU with the
    reference as the kernel."""
    y = kernel()
    if c is None:
        return y
    return add_offset_term(y, x, c, in_features, group_size)
