"""The GPU layout of a dual-binary layer (what the Triton kernels read) and the repack into it.

The reference layout (:mod:`dbllm_compile.reference.packing`) is ``uint8 [2, N, K_pad/8]``
(plane-major, LSB first) with scales ``a1, a2: [N, NG]``. The kernels read instead:

``qweight``: ``int32 [N, K_alloc/16]`` (row-major, contiguous), ``K_alloc = ceil(K_pad/1024)*1024``
    Each weight is stored as its 2-bit *code* ``c = b1 + 2*b2`` (both planes of an element side
    by side, so one load brings everything a tile needs). Word ``i`` of row ``n`` holds the 16
    elements ``k = 16*i + e``; element ``e = 8*slot + 2*q + h`` (``slot, h`` in {0, 1},
    ``q`` in 0..3) has

        b1 at bit  sh(q) + 4*(2*slot + h),   b2 at the bit above it,
        sh(q) = 2*(q % 2) + 16*(q // 2)      (0, 2, 16, 18).

    ``q`` is the lane of a quad in the tensor cores' operand layout (m16n8k16: lane ``q`` holds
    elements ``2q, 2q+1, 2q+8, 2q+9`` of every 16 along K), so ``(word >> sh(q)) & 0x3333``
    puts exactly that lane's four codes into the four nibbles of a byte-permute selector.
    Codes past ``K_pad`` are 0.

``scales``: ``[N, K_alloc/G, 2]`` in the activation dtype (fp16 or bf16), contiguous
    ``scales[n, g, 0] = a1[n, g]``, ``scales[n, g, 1] = a2[n, g]``; groups past ``NG`` are 0.

Why this layout. The batch-1 linear is limited by instruction issue as much as by memory:
at 2.5 bits per weight an H100 must turn about 8e12 weights per second into fp16, about 4
instructions per weight at full issue rate. The kernels build, per row and group, a 4-entry
table of the levels {0, a1, a2, a1+a2} as two byte-planar registers (``lut_lo`` holds the
low bytes of levels 0..3, ``lut_hi`` the high bytes) and decode four weights with

    sel = (word >> sh(q)) & 0x3333          # shift, and: the lane's 4 codes as nibbles
    lo  = prmt(lut_lo, sel); hi = prmt(lut_hi, sel)      # byte permute = table lookup
    w01 = prmt(lo, hi, 0x5140); w89 = prmt(lo, hi, 0x7362)  # interleave into 2 fp16 pairs

six instructions for four finished, scaled weights (1.5 per weight), against about 3.3 for
unpacking two {0,1} planes and scaling them with fp16 arithmetic.

Padding ``K`` to a multiple of 1024 makes every row 256-byte aligned and lets the kernels
(block sizes along K divide 1024) load weight tiles without masks; the K loop stops at the last
tile that holds real features, so the padding costs no bandwidth.

Numerics: the dequantized weight is ``a1`` / ``a2`` / ``a1 + a2`` (sum rounded once to the
activation dtype) after the scales are cast to the activation dtype. With fp16 scales and fp16
activations this equals the reference's ``fp16(float32(a1*b1 + a2*b2))`` (up to rare
double-rounding ties of the sum); with bf16 activations the scales are rounded to bf16 first
(at most one bf16 ulp of the weight apart).

Constraints: ``G`` must be a multiple of 16 that divides 1024 (16, 32, ..., 1024); other group
sizes run the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbllm_compile.reference.dual_binary import num_groups, padded_in_features

__all__ = [
    "K_ALIGN",
    "GpuWeights",
    "supports_group_size",
    "to_gpu_layout",
    "from_gpu_layout",
    "dequantize_gpu_layout",
]

K_ALIGN = 1024
"""Bits per row of ``qweight`` are padded to a multiple of this."""


@dataclass(frozen=True)
class GpuWeights:
    """A layer's weights in the GPU layout (see the module docstring).

    Attributes:
        qweight: ``int32 [N, K_alloc/16]``.
        scales: ``[N, K_alloc/G, 2]`` in the activation dtype.
        in_features: ``K``.
        group_size: ``G``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def k_pad(self) -> int:
        return padded_in_features(self.in_features, self.group_size)

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)


def supports_group_size(group_size: int) -> bool:
    """True if the kernels handle this group size (a multiple of 16 dividing 1024)."""
    return group_size % 16 == 0 and K_ALIGN % group_size == 0


def _check(packed: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, in_features: int, group_size: int) -> None:
    if not supports_group_size(group_size):
        raise ValueError(
            f"GPU layout: group_size={group_size} is not supported (needs a multiple of 16 that "
            f"divides {K_ALIGN}); use the reference path or re-quantize with group_size=64"
        )
    k_pad = padded_in_features(in_features, group_size)
    ng = num_groups(in_features, group_size)
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[0] != 2 or packed.shape[2] * 8 != k_pad:
        raise ValueError(
            f"GPU layout: packed must be uint8 [2, N, {k_pad // 8}] for in_features={in_features}, "
            f"group_size={group_size}; got {packed.dtype} {tuple(packed.shape)}"
        )
    n = packed.shape[1]
    for name, a in (("a1", a1), ("a2", a2)):
        if tuple(a.shape) != (n, ng):
            raise ValueError(f"GPU layout: {name} shape {tuple(a.shape)} != {(n, ng)}")


def _code_shifts(device: torch.device) -> torch.Tensor:
    """Bit position of b1 of element ``e = 0..15`` of a word (b2 is the bit above)."""
    e = torch.arange(16, dtype=torch.int64, device=device)
    slot, q, h = e // 8, (e % 8) // 2, e % 2
    return 2 * (q % 2) + 16 * (q // 2) + 4 * (2 * slot + h)


@torch.no_grad()
def to_gpu_layout(
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    in_features: int,
    group_size: int,
    dtype: torch.dtype,
    rows_per_chunk: int = 4096,
) -> GpuWeights:
    """Repack reference-layout planes and scales into the GPU layout, on their device.

    Runs as plain torch ops in row chunks (peak extra memory about ``18 * rows_per_chunk *
    K_pad`` bytes), once per layer; the dispatcher caches the result.

    Example:
        >>> from dbllm_compile.reference import pack_planes
        >>> b = torch.randint(0, 2, (2, 4, 64), dtype=torch.uint8)
        >>> gw = to_gpu_layout(pack_planes(b[0], b[1]), torch.ones(4, 1), torch.ones(4, 1), 64, 64, torch.float16)
        >>> tuple(gw.qweight.shape), tuple(gw.scales.shape)
        ((4, 64), (4, 16, 2))
    """
    _check(packed, a1, a2, in_features, group_size)
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"GPU layout: activation dtype must be float16 or bfloat16, got {dtype}")
    n, c_bytes = packed.shape[1], packed.shape[2]
    k_pad = c_bytes * 8
    k_alloc = -(-k_pad // K_ALIGN) * K_ALIGN
    dev = packed.device
    qweight = torch.zeros(n, k_alloc // 16, dtype=torch.int32, device=dev)
    shifts = _code_shifts(dev)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        bits = (packed[:, r0:r1].unsqueeze(-1) >> byte_shifts) & 1  # [2, r, C, 8]
        bits = bits.reshape(2, r1 - r0, k_pad // 16, 16).to(torch.int64)
        codes = bits[0] + 2 * bits[1]  # [r, k_pad/16, 16]
        words = (codes << shifts).sum(-1)  # distinct bit positions: the sum is an or, < 2**32
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        qweight[r0:r1, : k_pad // 16] = words
    ng = a1.shape[1]
    scales = torch.zeros(n, k_alloc // group_size, 2, dtype=dtype, device=dev)
    scales[:, :ng, 0] = a1.to(dtype)
    scales[:, :ng, 1] = a2.to(dtype)
    return GpuWeights(qweight, scales, in_features, group_size)


@torch.no_grad()
def from_gpu_layout(gw: GpuWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_gpu_layout`: ``(packed uint8 [2, N, K_pad/8], a1, a2)`` (for tests).

    The scales come back in the GPU layout's dtype.
    """
    k_pad, ng = gw.k_pad, gw.num_groups
    q = gw.qweight[:, : k_pad // 16].to(torch.int64) & 0xFFFFFFFF  # [N, W]
    codes = (q.unsqueeze(-1) >> _code_shifts(q.device)) & 3  # [N, W, 16]
    planes = torch.stack([codes & 1, codes >> 1]).reshape(2, q.shape[0], k_pad).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    packed = (planes.reshape(2, q.shape[0], k_pad // 8, 8) << shifts).sum(-1, dtype=torch.uint8)
    return packed, gw.scales[:, :ng, 0].clone(), gw.scales[:, :ng, 1].clone()


def dequantize_gpu_layout(gw: GpuWeights) -> torch.Tensor:
    """Dense ``[N, K]`` weight in the scales' dtype, from the GPU layout with torch ops only.

    Level ``a1 + a2`` is rounded once to the scales' dtype, as the kernels do.
    """
    k_pad = gw.k_pad
    q = gw.qweight[:, : k_pad // 16].to(torch.int64) & 0xFFFFFFFF
    codes = ((q.unsqueeze(-1) >> _code_shifts(q.device)) & 3).reshape(q.shape[0], -1, gw.group_size)
    a1 = gw.scales[:, : gw.num_groups, 0:1]
    a2 = gw.scales[:, : gw.num_groups, 1:2]
    levels = torch.stack([torch.zeros_like(a1), a1, a2, a1 + a2], dim=-1)  # [N, NG, 1, 4]
    w = torch.gather(levels.expand(-1, -1, gw.group_size, -1), -1, codes.unsqueeze(-1)).squeeze(-1)
    return w.reshape(q.shape[0], k_pad)[:, : gw.in_features]
