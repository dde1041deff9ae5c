"""Split-K for the decode path: the K plan, the reduce kernel, and the heuristics choosing splits.

At batch 1 the fused kernel (:func:`~.kernels.db_matmul_kernel`) is latency- and occupancy-bound:
one program per ``BLOCK_N`` rows gives 64 programs for a 4096 x 4096 layer and 128 for
8192 x 8192 on a 132-SM H100, which holds about four such programs per SM at once
(``docs/kernels.md``, Nsight analysis). With ``SPLIT_K > 1`` the grid gets a second axis over K:

1. program ``(tile, s)`` runs the same main loop over its own range of K tiles and writes a
   float32 partial ``[M, N]`` to a workspace ``[splits, M, N]`` (allocated by the launcher with
   ``torch.empty``: safe in CUDA graph capture and inside a ``triton_op``);
2. :func:`splitk_reduce_kernel` sums the partials in the fixed order ``s = 0, 1, ...``
   (deterministic: the same inputs give bit-identical outputs), adds the bias, casts to the
   output dtype and writes ``out`` with its row stride.

:func:`split_plan` cuts K into whole ``BLOCK_K`` tiles (``BLOCK_K`` divides 1024 and the GPU
layout pads K to a multiple of 1024, so every tile loads without masks) and counts only tiles
with real features: a configured split that would get no real tile is not launched. A plan with
one split runs the single-kernel path (no workspace, no second kernel).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

__all__ = ["split_plan", "splitk_reduce_kernel", "launch_reduce", "default_split_k", "split_options",
           "sm_count", "H100_SMS", "RESIDENT_PER_SM"]

H100_SMS = 132
"""SM count assumed where no GPU can be asked (interpreter, CPU): the H100 SXM the kernels are tuned on."""

RESIDENT_PER_SM = 4
"""Decode programs (``m16n64k256``, 4 warps) one H100 SM holds at once: 117 registers per thread
and 48 KB of shared memory (Nsight Compute, ``benchmarks/results/h100_2026-11-23_ncu_28672x8192_m1.txt``)."""

REDUCE_BLOCK = 512
"""Output elements per program of the reduce kernel (4 float32 per thread at 4 warps)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """``(tiles_per_split, splits)`` for ``k`` real features, ``BLOCK_K`` tiles, ``split_k`` wanted.

    Split ``s`` covers tiles ``[s * tiles_per_split, (s + 1) * tiles_per_split)`` of the
    ``cdiv(k, block_k)`` tiles holding real features; ``splits = cdiv(tiles, tiles_per_split)``
    <= ``split_k`` counts the splits that get at least one of them (the others are not launched).
    E.g. ``k = 576, block_k = 64, split_k = 8``: 9 tiles, 2 per split, 5 splits.
    """
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1 (1 = no split), got {split_k}")
    tiles = max(1, _cdiv(k, block_k))
    per = _cdiv(tiles, split_k)
    return per, _cdiv(tiles, per)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr,  # float32 [SPLITS, M, N], contiguous (stride_ws = M * N between splits)
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N], row stride stride_om, unit stride along N
    N, SPLITS, stride_ws, stride_om,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``out[m, n] = cast(ws[0, m, n] + ws[1, m, n] + ... + bias[n])``, summed in float32 in split
    order; grid ``(M, cdiv(N, BLOCK))``."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    ptrs = ws_ptr + pid_m.to(tl.int64) * N + offs_n
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLITS):
        ptrs += stride_ws
        acc += tl.load(ptrs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_m.to(tl.int64) * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, wrap: bool = False) -> None:
    """Sum the partials ``ws [splits, M, N]`` (float32) into ``out [M, N]`` (+ ``bias``, in ``out``'s dtype)."""
    splits, m, n = ws.shape
    kernel = torch.library.wrap_triton(splitk_reduce_kernel) if wrap else splitk_reduce_kernel
    kernel[(m, _cdiv(n, REDUCE_BLOCK))](
        ws, bias if bias is not None else ws, out, n, splits, ws.stride(0), out.stride(0),
        BLOCK=REDUCE_BLOCK, HAS_BIAS=bias is not None, num_warps=4,
    )


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | None = None) -> int:
    """SMs of ``device`` (default: the current CUDA device); :data:`H100_SMS` without a CUDA GPU."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return H100_SMS
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _device_sms(index)


def default_split_k(n: int, k: int, block_n: int, block_k: int, sms: int = H100_SMS, *,
                    min_programs_per_sm: float = 3.5, min_split_tiles: int = 4, max_split: int = 8) -> int:
    """SPLIT_K of the untuned decode configuration (graph capture, traced ops, interpreter).

    Why: untuned, a decode grid of ``cdiv(N, BLOCK_N)`` programs leaves most SMs idle on layers
    with few output rows (64 programs for N = 4096 on 132 SMs), and a program alone on its SM
    cannot keep enough loads in flight. Doubling the split doubles the programs. Rules:

    - double ``S`` (1, 2, 4, 8 at most ``max_split``) while the grid holds fewer than
      ``min_programs_per_sm`` programs per SM (close to the four an H100 SM holds at once,
      :data:`RESIDENT_PER_SM`: beyond that the programs already fill the SMs, and each doubling
      costs a larger workspace and more work in the reduce kernel);
    - each split keeps at least ``min_split_tiles`` K tiles (1024 features at ``BLOCK_K`` =
      256): a program spends a fixed cost on filling its load pipeline (``num_stages``) and on
      writing its partial, so very short splits mostly add overhead. Layers with fewer than
      ``2 * min_split_tiles`` K tiles (K <= 1792 at ``BLOCK_K`` = 256, e.g. every SmolLM2-135M
      linear: K = 576 or 1536) therefore stay unsplit; the small ones among them are bound by
      launch latency, which the reduce kernel's launch would add to.

    With ``block_n=64, block_k=256`` on 132 SMs: 4096 x 4096 -> 4, 11008 x 4096 -> 4,
    4096 x 11008 -> 8, 8192 x 8192 -> 4, 28672 x 8192 -> 2 (N x K). Checked against the tuner on
    an H100 (2026-11-24, M = 1, ``benchmarks/results/kernels_h100_2026-11-24``): these choices
    are the tuned ones or within 1.5% of them, except 11008 x 4096 (split 3 tuned, 7.7% faster
    than 4). The threshold was 3 programs per SM before that run (28672 x 8192 -> 1, 2.4% slower).
    """
    tiles_n = _cdiv(n, block_n)
    tiles_k = _cdiv(k, block_k)
    s = 1
    while (s * 2 <= max_split and tiles_n * s < min_programs_per_sm * sms
           and tiles_k >= 2 * s * min_split_tiles):
        s *= 2
    return s


def split_options(n: int, k: int, block_n: int, block_k: int, sms: int = H100_SMS, *,
                  min_split_tiles: int = 2, max_split: int = 16, max_waves: float = 4.0) -> list[int]:
    """SPLIT_K values (> 1) worth tuning for one block configuration of a decode shape.

    A wave is ``sms * RESIDENT_PER_SM`` programs (528 on an H100). The possible splits are the
    distinct ``cdiv(K tiles, t)`` for ``t >= min_split_tiles`` tiles per split (so each value
    launches exactly that many splits and none duplicates another), at most ``max_split``, with
    at most ``max_waves`` waves of programs. Of these, the ones whose program count is nearest
    (in ratio) to one wave and to two waves are kept, plus :func:`default_split_k`'s choice when
    possible, so the tuner always measures the untuned default too. Empty when K is too short
    to split.
    """
    tiles_n = _cdiv(n, block_n)
    tiles_k = _cdiv(k, block_k)
    wave = sms * RESIDENT_PER_SM
    valid = sorted({s for s in (_cdiv(tiles_k, t) for t in range(min_split_tiles, tiles_k + 1))
                    if 1 < s <= max_split and tiles_n * s <= max_waves * wave and split_plan(k, block_k, s)[1] == s})
    if not valid:
        return []
    chosen = {min(valid, key=lambda s: (abs(math.log(tiles_n * s / target)), s)) for target in (wave, 2 * wave)}
    d = default_split_k(n, k, block_n, block_k, sms)
    if d in valid:
        chosen.add(d)
    return sorted(chosen)
