"""Pure-PyTorch reference of every numeric piece.

These functions define the numerics: the CPU execution path calls them, and every kernel and
graph pass is tested against them. They favour clarity over speed.
"""

from dbllm_compile.reference.dual_binary import (
    InitResult,
    assign_bits,
    check_weight,
    dequantize_bits,
    fake_quantize_weight,
    group_levels,
    init_scales,
    num_groups,
    padded_in_features,
)
from dbllm_compile.reference.linear import db_linear_packed_reference, db_linear_train_reference
from dbllm_compile.reference.packing import pack_bits, pack_planes, unpack_bits, unpack_planes
from dbllm_compile.reference.rotation import hadamard_matrix, rotate, rotate_weight
from dbllm_compile.reference.sign_codebook import SignInitResult, init_sign_scales

__all__ = [
    "InitResult",
    "SignInitResult",
    "assign_bits",
    "check_weight",
    "db_linear_packed_reference",
    "db_linear_train_reference",
    "dequantize_bits",
    "fake_quantize_weight",
    "group_levels",
    "hadamard_matrix",
    "init_scales",
    "init_sign_scales",
    "num_groups",
    "pack_bits",
    "pack_planes",
    "padded_in_features",
    "rotate",
    "rotate_weight",
    "unpack_bits",
    "unpack_planes",
]
