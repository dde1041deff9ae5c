"""Decompose the deploy op ``dbllm.db_linear`` into ATen ops: unpack the bit planes, then matmul.

For compilers that cannot call a ``torch.library`` custom op: AOTInductor on CPU (a custom op
is opaque to Inductor and a package calling it would need dbllm_compile at run time) and
torch-mlir's lowerings below the torch dialect. The decomposition is the op's own reference
(:func:`dbllm_compile.reference.linear.db_linear_packed_reference`), which is written in ATen
ops only, so the decomposed graph computes bit-identical results on CPU:

    bits[..., c, j] = (packed[..., c] >> j) & 1                  uint8 [2, N, K_pad]
    w[n, k]        = a1[n, k // G] * bits[0, n, k] + a2[n, k // G] * bits[1, n, k]   (float32)
    y              = x @ w[:, :K].to(x.dtype).T + bias

The packed planes stay 2 bits per weight in the program; the dense weight exists only inside
the computation.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from dbllm_compile.errors import GraphPassError
from dbllm_compile.ops import DEPLOY_OP
from dbllm_compile.reference.linear import db_linear_packed_reference

__all__ = ["DUAL_BINARY_DECOMPOSITIONS", "decompose_dual_binary"]

DUAL_BINARY_DECOMPOSITIONS = {DEPLOY_OP: db_linear_packed_reference}
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
