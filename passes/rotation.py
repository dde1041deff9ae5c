"""Insert the Hadamard input rotation before the dual-binary linears (``rotation_block > 0``).

Runs inside :func:`~dbllm_compile.passes.quantize_linears.quantize_linears`, after the linears are
rewritten into ``dbllm.db_linear_train`` nodes whose latent weights already hold ``W @ Q``
(:func:`dbllm_compile.reference.rotation.rotate_weight`, applied before the initialisation), and
before the 4-bit activation quantizers are inserted. The inputs of those nodes are grouped by the
activation they read exactly as the activation pass groups them
(:func:`~dbllm_compile.passes.activation_quant.quantized_inputs`: through view-like ops, so
q/k/v share one rotation and gate/up another); each group gets ONE ``dbllm.hadamard(root, B)``
node right after the shared activation, and every linear of the group reads it (through a copy
of its view chain). The activation quantizers inserted later then find the rotated activation as
their root and quantize it once, in the rotated basis.

Invariants: the graph computes the same function in full precision (``Q`` is orthonormal);
``node.meta["val"]`` of an inserted node is the value of its input; a linear whose ``K`` the block
does not divide is an error naming the layer (checked before anything is inserted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from dbllm_compile.errors import ConfigError
from dbllm_compile.ops import HADAMARD_OP
from dbllm_compile.passes.activation_quant import insert_after, quantized_inputs, rewire

__all__ = ["InputRotation", "check_rotation_fits", "insert_input_rotation"]


@dataclass
class InputRotation:
    """One inserted rotation: its node, the activation it rotates, its readers and block size."""

    node: str
    input: str
    layers: list[str] = field(default_factory=list)
    block: int = 0
    in_features: int = 0


def check_rotation_fits(names_and_k: list[tuple[str, int]], block: int) -> None:
    """Raise a :class:`~dbllm_compile.errors.ConfigError` unless ``block`` divides every ``K``
    of ``names_and_k`` (layer name, input features)."""
    bad = [(name, k) for name, k in names_and_k if k % block]
    if bad:
        raise ConfigError(
            f"rotation_block={block} does not divide the input features of {bad[0][0]} (K={bad[0][1]}; "
            f"{len(bad)} layer(s) in all: {[n for n, _ in bad[:4]]}): choose a power-of-two block that "
            f"divides every quantized layer's in_features, exclude those layers, or use rotation_block=0"
        )


def insert_input_rotation(gm: fx.GraphModule, block: int) -> list[InputRotation]:
    """Insert one ``dbllm.hadamard`` per distinct input of the training-form linears of ``gm``
    (module docstring). The latent weights must already be rotated. Returns the rotations in graph
    order; the caller lints and recompiles.

    Example:
        >>> import torch
        >>> from dbllm_compile.passes.export import export_model
        >>> from dbllm_compile.passes.quantize_linears import quantize_linears
        >>> from dbllm_compile.config import DBLLMConfig
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> gm = export_model(m, (torch.randn(2, 64),))[0].module()
        >>> r = quantize_linears(gm, DBLLMConfig(rotation_block=64, keep_head=False))
        >>> [(q.layers, q.block) for q in r.rotations]
        [(['0.weight'], 64), (['2.weight'], 64)]
    """
    groups = quantized_inputs(gm)
    check_rotation_fits([(readers[0].args[1].target.removesuffix(".weight"), k) for readers, k in groups.values()],
                        block)
    out = []
    for root, (readers, k) in groups.items():
        rotated = insert_after(gm, root, lambda: gm.graph.call_function(HADAMARD_OP, (root, block)))
        for linear in readers:
            rewire(gm, linear, root, rotated)
        out.append(InputRotation(rotated.name, root.name, [n.args[1].target for n in readers], block, k))
    return out
