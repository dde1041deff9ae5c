"""CUDA implementations of ``dbllm::act_quant_int`` and ``dbllm::db_linear_a4`` (W(1+1)A4).

Registered by :func:`dbllm_compile.backends.triton.register`. The Triton kernels live in
:mod:`.a4`, imported on the first call only (so that importing the package never defines
kernels before a test switches on the interpreter). ``db_linear_a4`` reuses the weight cache of
:mod:`.dispatch` (the same GPU layout as the 16-bit kernels), runs the exact two-products-per-group
int8 GEMM, and adds the sign codebook's offset term outside the kernel, as ``db_linear`` does.
Falls back to the reference (on the GPU) for output dtypes other than fp16/bf16 and group sizes
the int8 GEMM does not take (not a multiple of 32 dividing 1024).

Kernel configurations are fixed by M (``a4.default_a4_blocks``), not tuned yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbllm_compile.reference.activation import dequantize_activation, quantize_activation_int
from dbllm_compile.reference.dual_binary import padded_in_features
from dbllm_compile.ops_int import db_linear_a4_reference
from dbllm_compile.reference.linear import add_offset_term

from .dispatch import prepare_cached

__all__ = ["act_quant_int_cuda", "db_linear_a4_cuda"]


def act_quant_int_cuda(x: torch.Tensor, clip_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``dbllm::act_quant_int``: bit-exact with the reference."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.numel() == 0:
        return quantize_activation_int(x, clip_ratio)
    from .a4 import act_quant_int8

    k = x.shape[-1]
    q, s = act_quant_int8(x.reshape(-1, k), clip_ratio)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def db_linear_a4_cuda(codes: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, a1: torch.Tensor,
                      a2: torch.Tensor, bias: torch.Tensor | None, in_features: int, group_size: int,
                      out_dtype: torch.dtype, c: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA kernel of ``dbllm::db_linear_a4`` (see the module docstring)."""
    from .a4 import a4_matmul, a4_supported

    if out_dtype not in (torch.float16, torch.bfloat16) or not a4_supported(group_size):
        return db_linear_a4_reference(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c)
    gw = prepare_cached(packed, a1, a2, in_features, group_size, out_dtype)
    q2 = codes.reshape(-1, in_features)
    k_pad = padded_in_features(in_features, group_size)
    if k_pad != in_features:
        q2 = F.pad(q2, (0, k_pad - in_features))
    elif q2.stride(-1) != 1:
        q2 = q2.contiguous()
    y = a4_matmul(q2, scale.reshape(-1), gw, bias, out_dtype)
    y = y.reshape(*codes.shape[:-1], gw.out_features)
    if c is None:
        return y
    return add_offset_term(y, dequantize_activation(codes, scale, out_dtype), c, in_features, group_size)
