"""Integer-activation deploy ops of W(1+1)A4: the int8 codes travel between the ops.

``torch.ops.dbllm.act_quant_int(x, clip_ratio) -> (codes, scale)``
    The per-token 4-bit quantizer of :mod:`dbllm_compile.reference.activation` in integer form:
    ``codes`` int8 ``[..., K]`` in ``[-7, 7]``, ``scale`` float32 ``[..., 1]``. Per token only
    (``group_size=0``): the int8 path has no per-group activation scales yet (the Triton A4 GEMM
    applies one activation scale per row), so
    :func:`~dbllm_compile.passes.int_activations.use_int_activations` leaves ``act_quant`` nodes
    with ``group_size > 0`` on the fake-quant ``act_quant`` + ``db_linear`` path.

``torch.ops.dbllm.db_linear_a4(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c=None)``
    The dual-binary linear on quantized activations: ``x_hat = (codes * scale).to(out_dtype)``,
    then exactly ``dbllm::db_linear(x_hat, packed, a1, a2, bias, in_features, group_size, c)``.

So ``act_quant_int`` followed by ``db_linear_a4`` computes bit for bit what ``act_quant``
followed by ``db_linear`` computes with the references (CPU); the pass
:func:`dbllm_compile.passes.int_activations.use_int_activations` rewrites one form into the
other. What the split buys is on the GPU: the codes are made once per shared activation (q/k/v,
gate/up) by one kernel, and the linears run the int8 GEMM of ``backends/triton/a4.py``
(registered as the CUDA kernels of both ops by :func:`dbllm_compile.backends.triton.register`),
which differs from the reference only by float32 scaling and the final rounding.

Deploy-only: no autograd (the ``act_quant``/``db_linear`` form is the one to differentiate).
"""

from __future__ import annotations

import torch

from dbllm_compile.ops import _check_act_args, _check_deploy_args
from dbllm_compile.reference.activation import dequantize_activation, quantize_activation_int
from dbllm_compile.reference.linear import db_linear_packed_reference

__all__ = ["act_quant_int", "db_linear_a4", "db_linear_a4_reference", "ACT_QUANT_INT_OP", "DB_LINEAR_A4_OP"]


@torch.library.custom_op("dbllm::act_quant_int", mutates_args=())
def act_quant_int(x: torch.Tensor, clip_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(codes int8 [..., K], scale float32 [..., 1])`` (module docstring)."""
    _check_act_args("act_quant_int", x, clip_ratio)
    codes, scale = quantize_activation_int(x, clip_ratio)
    return codes, scale


@act_quant_int.register_fake
def _act_quant_int_fake(x, clip_ratio):
    _check_act_args("act_quant_int", x, clip_ratio)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_a4_args(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c) -> None:
    torch._check(codes.dtype == torch.int8, lambda: f"db_linear_a4: codes must be int8, got {codes.dtype}")
    torch._check(scale.dtype == torch.float32, lambda: f"db_linear_a4: scale must be float32, got {scale.dtype}")
    torch._check(tuple(scale.shape) == (*codes.shape[:-1], 1),
                 lambda: f"db_linear_a4: scale shape {tuple(scale.shape)} != {(*codes.shape[:-1], 1)}")
    torch._check(out_dtype.is_floating_point, lambda: f"db_linear_a4: out_dtype must be a float dtype, got {out_dtype}")
    _check_deploy_args(codes, packed, a1, a2, bias, in_features, group_size, c)


@torch.library.custom_op("dbllm::db_linear_a4", mutates_args=())
def db_linear_a4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-binary linear on 4-bit activation codes (module docstring)."""
    _check_a4_args(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c)
    return db_linear_a4_reference(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c)


def db_linear_a4_reference(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c=None):
    """The reference of ``db_linear_a4``: dequantize the codes, then the packed dual-binary linear."""
    x_hat = dequantize_activation(codes, scale, out_dtype)
    return db_linear_packed_reference(x_hat, packed, a1, a2, bias, in_features, group_size, c)


@db_linear_a4.register_fake
def _db_linear_a4_fake(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c=None):
    _check_a4_args(codes, scale, packed, a1, a2, bias, in_features, group_size, out_dtype, c)
    return codes.new_empty((*codes.shape[:-1], packed.shape[1]), dtype=out_dtype)


ACT_QUANT_INT_OP = torch.ops.dbllm.act_quant_int.default
DB_LINEAR_A4_OP = torch.ops.dbllm.db_linear_a4.default
