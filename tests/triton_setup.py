"""Shared setup of the Triton kernel tests: interpreter on machines without a GPU, test layers,
the float32 reference product and its tolerance.

Imported first by ``test_triton_kernels.py``, ``test_triton_splitk.py`` and
``test_triton_a4.py``: without a GPU it sets ``TRITON_INTERPRET=1`` before Triton is imported,
then skips the importing module when Triton is missing or the interpreter was switched off.
"""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install 'dbllm-compile[triton]')")

from dbllm_compile.backends.triton import launch  # noqa: E402
from dbllm_compile.reference import pack_planes  # noqa: E402

if not GPU and not launch.interpreted():
    pytest.skip("no GPU and TRITON_INTERPRET was switched off: the kernels cannot run", allow_module_level=True)

DEVICE = torch.device("cuda" if GPU else "cpu")


def make_layer(n: int, k: int, g: int, seed: int = 0, device=DEVICE):
    """Random bits (0 past K) and scales of both signs, as a deployed layer stores them."""
    gen = torch.Generator().manual_seed(seed)
    k_pad = -(-k // g) * g
    bits = torch.randint(0, 2, (2, n, k_pad), generator=gen, dtype=torch.uint8)
    bits[:, :, k:] = 0
    a1 = (torch.rand(n, k_pad // g, generator=gen) * 0.04 + 0.01).half()
    a2 = (-torch.rand(n, k_pad // g, generator=gen) * 0.02).half()
    bias = torch.randn(n, generator=gen).half()
    packed = pack_planes(bits[0], bits[1])
    return packed.to(device), a1.to(device), a2.to(device), bias.to(device), bits


DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float16]
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(x, packed, a1, a2, bias, k, g):
    """float32 product of the weights the op's reference uses (``w_hat`` cast to x.dtype)."""
    from dbllm_compile.reference import dequantize_bits
    from dbllm_compile.reference.packing import unpack_planes

    k_pad = packed.shape[2] * 8
    b1, b2 = unpack_planes(packed.cpu(), k_pad)
    w = dequantize_bits(b1, b2, a1.cpu(), a2.cpu(), g)[:, :k].to(x.dtype).float()
    y = x.cpu().float() @ w.T
    return y if bias is None else y + bias.cpu().to(x.dtype).float()


def assert_close(y, ref, dtype):
    """``rtol`` = 2 ulp of the dtype, ``atol = rtol * max|ref|`` (see test_triton_kernels.py)."""
    rtol = RTOL[dtype]
    torch.testing.assert_close(y.cpu().float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
