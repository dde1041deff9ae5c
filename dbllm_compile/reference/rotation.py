"""Block-diagonal Hadamard rotation of a linear's input features (reference implementation).

A linear ``y = x @ W.T`` is unchanged when its input and its weight are rotated by the same
orthogonal matrix ``Q``: ``y = (x @ Q) @ (W @ Q).T`` because ``Q @ Q.T = I``. We use
``Q = diag(H_B, ..., H_B)`` with ``H_B`` the ``B x B`` Sylvester-Hadamard matrix scaled by
``1/sqrt(B)``:

    H_1 = [1],   H_2m = [[H_m, H_m], [H_m, -H_m]],   H_B[i, j] = (-1)^popcount(i & j) / sqrt(B)

``H_B`` is symmetric and orthonormal, so it is its own inverse. Rotating the last dimension in
blocks of ``B`` contiguous features:

    rotate(x, B)[..., b*B + j] = sum_i x[..., b*B + i] * H_B[i, j]        (K divisible by B)

Why: the rotation spreads a few large ("massive") activation channels over the ``B`` features of
their block, so a 4-bit activation grid with one scale per group of ``B`` features (or per token)
loses far less (SmolLM2-135M, full-precision weights, fake 4-bit activations, groups of 64:
WikiText-2 perplexity 76.2 without, 34.7 with a 64-block rotation; docs/results.md 4.3). The
quantized weight is ``W @ Q`` (the rotation is folded into the latent weight before the
post-training initialisation), and the deployed graph rotates each quantized activation once
(:mod:`dbllm_compile.passes.rotation`). With ``B`` equal to the weight group size, each weight
group is rotated within itself.

Numerics: computed in float32 (float64 for a float64 ``x``; ``x`` is upcast, the product rounded
back to ``x.dtype``), so a bf16/fp16 input sees one rounding. The rotation is exact up to float32 rounding: ``rotate(rotate(x,
B), B) == x`` within ~1e-6 relative.
"""

from __future__ import annotations

import functools

import torch

from dbllm_compile.errors import ConfigError

__all__ = ["check_rotation_block", "hadamard_matrix", "rotate", "rotate_weight"]


def check_rotation_block(block: object, where: str = "rotation block") -> int:
    """``block`` if it is a valid Hadamard block size (0 = no rotation, or a power of two >= 2),
    else a :class:`~dbllm_compile.errors.ConfigError` naming ``where`` and the fix."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0 or (block and (block < 2 or block & (block - 1))):
        raise ConfigError(
            f"{where} must be 0 (no rotation) or a power of two >= 2 (Sylvester-Hadamard blocks), got {block!r}; "
            f"64 (the weight group size) is the usual choice"
        )
    return block


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(block: int) -> torch.Tensor:
    i = torch.arange(block)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    b = bits.clone()
    while bool(b.any()):
        parity ^= b & 1
        b >>= 1
    h = 1.0 - 2.0 * parity.to(torch.float64)
    return (h / block**0.5).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _hadamard_on(block: int, device: torch.device) -> torch.Tensor:
    return _hadamard_cpu(block).to(device)


def hadamard_matrix(block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``H_B`` (float32 ``[B, B]``, symmetric; cached per
    device, so the eager op does not copy it to the GPU on every call). Do not modify it in place."""
    check_rotation_block(block)
    if block == 0:
        raise ConfigError("hadamard_matrix: block 0 means 'no rotation' and has no matrix")
    return _hadamard_on(block, torch.device(device if device is not None else "cpu"))


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` with its last dimension rotated by ``diag(H_B, ...)`` (module docstring); same shape
    and dtype. ``x.shape[-1]`` must be divisible by ``block``."""
    k = x.shape[-1]
    if k % block:
        raise ConfigError(f"rotate: the feature dimension {k} is not divisible by the Hadamard block {block}")
    acc = torch.promote_types(x.dtype, torch.float32)
    h = hadamard_matrix(block, x.device).to(acc)
    y = x.to(acc).reshape(*x.shape[:-1], k // block, block) @ h
    return y.reshape(x.shape).to(x.dtype)


def rotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The weight ``W @ Q`` of a linear ``[N, K]`` whose input is rotated by :func:`rotate`, so that
    ``rotate(x) @ rotate_weight(W).T == x @ W.T`` (``Q`` is symmetric: the same product)."""
    return rotate(weight, block)
