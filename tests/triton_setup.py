"""Shared setup of the Triton kernel tests: interpreter on machines without a GPU, test layers.

Imported first by ``test_triton_kernels.py`` and ``test_triton_a4.py``: without a GPU it sets
``TRITON_INTERPRET=1`` before Triton is imported, then skips the importing module when Triton
is missing or the interpreter was switched off.
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
