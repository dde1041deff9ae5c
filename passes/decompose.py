"""Decompose the deploy op ``dbllm.db_linear`` into ATen ops: unpack the bit planes, then matmul.

For compilers that cannot call a ``torch.library`` custom op: AOTInductor on CPU (a custom op
is opaque to Inductor and a package calling it would need dbllm_compile at run time) and
torch-mlir's lowerings below the torch dialect. The decomposition is the op's own reference
(:func:`dbllm_compile.reference.linear.db_linear_packed_reference`), which is written in ATen
ops only; this decomposition computes the same numbers with the same float32 operations, but
shifts int32 with ``aten.bitwise_right_shift`` rather than ``uint8`` with ``>>`` (torch-mlir
knows no ``aten.__rshift__`` and lowers few ``ui8`` ops), so the decomposed graph is
bit-identical to the op on CPU:

    bits[p, n, 8c + j] = (int32(packed[p, n, c]) >> j) & 1        [2, N, K_pad] (LSB first)
    w[n, k]        = a1[n, k // G] * bits[0, n, k] + a2[n, k // G] * bits[1, n, k]   (float32)
                     (+ c[n, k // G] for the sign codebook, the op's optional last argument)
    y              = x @ w[:, :K].to(x.dtype).T + bias

The packed planes stay 2 bits per weight in the program; the dense weight exists only inside
the computation.

``dbllm.hadamard(x, B)`` (rotated models, ``rotation_block``) decomposes into a reshape and a
float32 matmul with ``H_B``, built in the graph from ``arange`` and bit operations (no constant
tensor), the same float32 product as the op's reference.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from dbllm_compile.errors import GraphPassError
from dbllm_compile.ops import DEPLOY_OP, HADAMARD_OP
from dbllm_compile.reference.dual_binary import num_groups

__all__ = ["DUAL_BINARY_DECOMPOSITIONS", "db_linear_decomposed", "decompose_dual_binary", "hadamard_decomposed"]

def db_linear_decomposed(
    x: torch.Tensor,
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dbllm.db_linear`` in plain ATen ops (see the module docstring).

    Shapes: ``x [..., K]``, ``packed uint8 [2, N, K_pad/8]``, ``a1, a2 [N, K_pad/G]``,
    ``bias [N]`` or None, offset ``c [N, K_pad/G]`` or None; returns ``[..., N]`` in ``x.dtype``.
    """
    _, n, row_bytes = packed.shape
    g = num_groups(in_features, group_size)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = torch.bitwise_right_shift(packed.to(torch.int32).unsqueeze(-1), shifts).bitwise_and(1).to(torch.float32).reshape(2, n, g, group_size)
    w = a1.float().unsqueeze(-1) * bits[0] + a2.float().unsqueeze(-1) * bits[1]
    if c is not None:  # same float32 operation order as dequantize_bits: (a1*b1 + a2*b2) + c
        w = w + c.float().unsqueeze(-1)
    w = w.reshape(n, row_bytes * 8)[:, :in_features]
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def hadamard_decomposed(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``dbllm.hadamard`` in plain ATen ops: ``H[i, j] = (-1)^popcount(i & j) / sqrt(B)``."""
    i = torch.arange(block_size, dtype=torch.int32, device=x.device)
    both = torch.bitwise_and(i.unsqueeze(1), i.unsqueeze(0))
    parity = torch.zeros_like(both)
    for bit in range(max(block_size - 1, 1).bit_length()):
        parity = torch.bitwise_xor(parity, torch.bitwise_and(torch.bitwise_right_shift(both, bit), 1))
    acc = torch.promote_types(x.dtype, torch.float32)
    h = ((1.0 - 2.0 * parity.to(torch.float64)) / float(block_size) ** 0.5).to(acc)
    k = x.shape[-1]
    y = x.to(acc).reshape(*x.shape[:-1], k // block_size, block_size) @ h
    return y.reshape(x.shape).to(x.dtype)


DUAL_BINARY_DECOMPOSITIONS = {DEPLOY_OP: db_linear_decomposed, HADAMARD_OP: hadamard_decomposed}
"""Decomposition table: ``dbllm.db_linear`` -> ATen (for ``ExportedProgram.run_decompositions``)."""


def decompose_dual_binary(ep: ExportedProgram, extra: dict | None = None) -> ExportedProgram:
    """``ep`` with every ``dbllm.db_linear`` node replaced by unpack + matmul ATen ops.

    Args:
        ep: an exported program of a deployed model.
        extra: more decompositions to apply in the same pass (e.g. core ATen's); by default
            nothing but the dual-binary op is decomposed (``aten.linear`` etc. stay).

    Example:
        >>> # ep = torch.export.export(deployed.graph_module, (ids,), {"use_cache": False})
        >>> # decompose_dual_binary(ep)   # no torch.ops.dbllm nodes left
    """
    table = {**(extra or {}), **DUAL_BINARY_DECOMPOSITIONS}
    out = ep.run_decompositions(table)
    left = [n.name for n in out.graph.nodes if n.op == "call_function" and str(n.target).startswith("dbllm.")]
    if left:
        raise GraphPassError(f"decompose_dual_binary: nodes {left[:5]} still call dbllm ops after decomposition")
    return out
