"""Bit packing of the two {0,1} planes (reference layout).

Layout (the *reference layout*, what :func:`dbllm_compile.convert` stores and the CPU path
reads; GPU kernels may repack it into a layout of their own):

- A plane is a ``[N, K_pad]`` tensor of bits, ``K_pad`` a multiple of 8.
- It packs into ``uint8`` ``[N, K_pad // 8]``; bit ``j`` (``j = 0`` is the least significant
  bit) of byte ``c`` of row ``n`` holds element ``[n, 8 * c + j]``.
- The two planes of a layer are stacked as ``packed[0] = b1`` and ``packed[1] = b2``:
  ``uint8 [2, N, K_pad // 8]``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "pack_planes", "unpack_planes"]


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of {0,1} values along its last dimension, eight to a byte, LSB first.

    The last dimension is zero-padded to a multiple of 8.

    Example:
        >>> pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]))
        tensor([129,   1], dtype=torch.uint8)
    """
    if bits.dtype == torch.bool:
        bits = bits.to(torch.uint8)
    if bits.is_floating_point() or bits.is_complex():
        raise TypeError(f"pack_bits expects integer or bool bits, got dtype {bits.dtype}")
    if bits.numel() and (bits.min() < 0 or bits.max() > 1):
        raise ValueError("pack_bits expects values in {0, 1}")
    k = bits.shape[-1]
    pad = (-k) % 8
    bits = bits.to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.reshape(*bits.shape[:-1], (k + pad) // 8, 8)
    shifts = _shifts(bits.device)
    # Distinct bits never carry, so a sum of shifted bits is their bitwise or.
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., C]`` to ``uint8 {0,1} [..., k]``.

    Example:
        >>> unpack_bits(torch.tensor([129, 1], dtype=torch.uint8), 9)
        tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8)
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8, got {packed.dtype}")
    if k > packed.shape[-1] * 8:
        raise ValueError(f"cannot unpack {k} bits from {packed.shape[-1]} bytes")
    shifts = _shifts(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :k]


def pack_planes(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Pack two ``[N, K_pad]`` bit planes into ``uint8 [2, N, K_pad // 8]``."""
    if b1.shape != b2.shape or b1.dim() != 2:
        raise ValueError(f"planes must be two equal 2-D shapes, got {tuple(b1.shape)} and {tuple(b2.shape)}")
    return torch.stack([pack_bits(b1), pack_bits(b2)])


def unpack_planes(packed: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_planes`."""
    if packed.dim() != 3 or packed.shape[0] != 2:
        raise ValueError(f"packed planes must have shape [2, N, C], got {tuple(packed.shape)}")
    return unpack_bits(packed[0], k_pad), unpack_bits(packed[1], k_pad)
