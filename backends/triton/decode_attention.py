"""Attention of one query token against a KV cache (decode), as a Triton kernel.

``torch.ops.dbllm.decode_attention(q, k, v, mask, scale) -> out``

- ``q``: ``[B, H, 1, D]``; ``k``, ``v``: ``[B, Hkv, L, D]`` (``H`` a multiple of ``Hkv``:
  grouped-query attention reads key/value head ``h // (H / Hkv)`` for query head ``h``);
- ``mask``: None (every position), or broadcastable to ``[B, H, 1, L]``: bool (True = attend)
  or additive float, as ``torch.nn.functional.scaled_dot_product_attention`` takes it;
- ``out``: ``[B, 1, H, D]`` in ``q``'s dtype (the layout Hugging Face attention functions
  return). A row with every position masked out gets zeros (SDPA gives NaN there).

Why a kernel of our own: at batch 1 PyTorch's SDPA dispatches a static-cache decode step (one
query row, a mask over the whole cache) to cuDNN's 64 x 64 tile flash kernel, about 6.9 us per
layer on an H100 for 152 cached positions of Llama-2-7B (``docs/results.md`` section 6), most
of it padding of the single query row to 64. Here each program owns one query head and a
slice of the cache (split-KV, ``SPLITS`` slices), keeps the online-softmax state (running max
``m``, sum ``l`` and the weighted sum of ``v``) in float32 registers, and a second small kernel
merges the slices (``SPLITS = 1``: one kernel writes ``out``). Scores are formed with
``exp2`` on ``q * scale * log2(e)``.

The CPU path (and any input the kernel does not take) is :func:`decode_attention_reference`,
float32 math in PyTorch. The tests hold the kernel to it (``tests/test_decode_attention.py``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["decode_attention", "decode_attention_reference", "default_splits", "launch_decode_attention"]

_LOG2E = 1.4426950408889634


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    """Float32 PyTorch reference of the op (shapes in the module docstring)."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale  # [B, H, 1, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows masked out entirely: zeros
    return (p @ vf).transpose(1, 2).to(q.dtype).contiguous()


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr,
    H, G, L, D, CHUNK, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_ml,
    stride_ob, stride_oh, stride_od,
    MASK_MODE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B * H, SPLITS)``: query head ``bh``, cache positions ``[s * CHUNK, (s + 1) * CHUNK)``.

    ``MASK_MODE``: 0 none, 1 bool (nonzero = attend), 2 additive. ``qk_scale`` = scale * log2(e).
    ``SPLITS > 1``: writes ``(acc[0:BLOCK_D], m, l)`` per slice to ``part_ptr`` (float32
    ``[B * H, SPLITS, BLOCK_D + 2]``) for :func:`decode_attention_combine_kernel`.
    """
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(tl.float32)  # Inductor passes the float scale as fp64
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_base = mask_ptr + b * stride_mb + h.to(tl.int64) * stride_mh
    m_i = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        ld_ok = l_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + offs_l[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                     mask=ld_ok, other=0.0)
        sc = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_L], log2 units
        if MASK_MODE == 1:
            keep = tl.load(m_base + offs_l * stride_ml, mask=l_ok, other=0)
            sc = tl.where(keep != 0, sc, float("-inf"))
        elif MASK_MODE == 2:
            add = tl.load(m_base + offs_l * stride_ml, mask=l_ok, other=0.0)
            sc = sc + add.to(tl.float32) * 1.4426950408889634
        sc = tl.where(l_ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2(-inf) = 0 below
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe)
        vt = tl.load(v_base + offs_l[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd,
                     mask=ld_ok, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
        m_i = m_new
    if SPLITS == 1:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(out_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + offs_d * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        row = part_ptr + (bh.to(tl.int64) * SPLITS + s) * (BLOCK_D + 2)
        tl.store(row + offs_d, acc)
        tl.store(row + BLOCK_D, m_i)
        tl.store(row + BLOCK_D + 1, l_i)


@triton.jit
def decode_attention_combine_kernel(
    part_ptr, out_ptr, H, D,
    stride_ob, stride_oh, stride_od,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B * H,)``: merges the ``SPLITS`` online-softmax states of one query head."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    rows = part_ptr + (bh.to(tl.int64) * SPLITS + offs_s) * (BLOCK_D + 2)
    m = tl.load(rows + BLOCK_D, mask=s_ok, other=float("-inf"))
    l = tl.load(rows + BLOCK_D + 1, mask=s_ok, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(mx == float("-inf"), 0.0, mx))  # [SPLITS_P2]; empty slices: 0
    acc = tl.load(rows[:, None] + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


def default_splits(batch_heads: int, cache_len: int, block_l: int, sms: int) -> int:
    """Slices of the cache per query head: enough programs for about two per SM, each slice at
    least one ``block_l`` tile, at most 16 slices."""
    tiles = triton.cdiv(cache_len, block_l)
    want = triton.cdiv(2 * sms, max(batch_heads, 1))
    return int(max(1, min(want, tiles, 16)))


_SM_COUNT: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _mask_view(mask: torch.Tensor | None, b: int, h: int, length: int) -> tuple[torch.Tensor | None, int, tuple]:
    """The mask as a ``[B, H, L]`` view (broadcast dims stride 0), its mode and strides."""
    if mask is None:
        return None, 0, (0, 0, 0)
    m4 = mask
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    m3 = m4.expand(b, h, 1, length)[:, :, 0, :]
    mode = 1 if m3.dtype == torch.bool else 2  # bool read as is (a dtype view does not lower in Inductor)
    return m3, mode, (m3.stride(0), m3.stride(1), m3.stride(2))


def launch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float, *, block_l: int = 32, splits: int | None = None, num_warps: int = 4,
                            wrap: bool = False) -> torch.Tensor:
    """Run the kernels (``wrap=True`` inside a ``triton_op``). ``splits=None``: :func:`default_splits`."""
    bsz, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    out = torch.empty((bsz, 1, h, d), dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    if splits is None:
        splits = default_splits(bsz * h, length, block_l, _sms(q.device))
    chunk = triton.cdiv(triton.cdiv(length, splits), block_l) * block_l
    splits = triton.cdiv(length, chunk)
    m3, mode, mstr = _mask_view(mask, bsz, h, length)
    part = (torch.empty((bsz * h, splits, block_d + 2), dtype=torch.float32, device=q.device)
            if splits > 1 else out)
    kern = torch.library.wrap_triton(decode_attention_kernel) if wrap else decode_attention_kernel
    kern[(bsz * h, splits)](
        q, k, v, m3 if m3 is not None else q, out, part,
        h, h // hkv, length, d, chunk, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        mstr[0], mstr[1], mstr[2],
        out.stride(0), out.stride(2), out.stride(3),
        MASK_MODE=mode, SPLITS=splits, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps,
    )
    if splits > 1:
        comb = torch.library.wrap_triton(decode_attention_combine_kernel) if wrap else decode_attention_combine_kernel
        comb[(bsz * h,)](
            part, out, h, d, out.stride(0), out.stride(2), out.stride(3),
            SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=1,
        )
    return out


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the Triton path handles these inputs (else the reference runs)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] <= 256)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "decode_attention: q, k, v must be [B, heads, tokens, head_dim]")
    torch._check(q.shape[2] == 1, lambda: f"decode_attention: one query token only, got {q.shape[2]}")
    torch._check(k.shape == v.shape, lambda: f"decode_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3],
                 lambda: f"decode_attention: q {tuple(q.shape)} does not match the cache {tuple(k.shape)}")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"decode_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")


@torch.library.triton_op("dbllm::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """See the module docstring."""
    _check(q, k, v, mask)
    if not kernel_takes(q, k, v, mask):
        return decode_attention_reference(q, k, v, mask, scale)
    return launch_decode_attention(q, k, v, mask, scale, wrap=True)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
