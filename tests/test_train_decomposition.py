"""The decomposed training op must choose the same bits as ``dbllm::db_linear_train`` once compiled.

Its scales are rounded to the stored dtype with integer operations on the float32 bits
(``round_like_cast``) because Inductor drops a ``.to(float16).float()`` round trip inside a fused
kernel: with torch 2.11 on the H100 machine, ``emulate_precision_casts`` did not keep it, and the
compiled training weight differed from the eager one in 36% of its entries (2026-11-24).
"""

from __future__ import annotations

import pytest
import torch

from dbllm_compile.backends.dynamo.train_decomposition import round_like_cast, train_weight_decomposed
from dbllm_compile.reference.linear import train_weight_reference

DTYPES = [torch.float16, torch.bfloat16]


def _values(dtype: torch.dtype) -> torch.Tensor:
    """Random magnitudes from 2^-30 to 2^16, both signs, plus the hard cases: exact ties halfway
    between neighbours of ``dtype``, float16's subnormals and its overflow edge, signed zeros."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(50_000, generator=g) * 2 - 1) * 2.0 ** torch.randint(-30, 17, (50_000,), generator=g).float()
    lo = x.to(dtype)
    hi = torch.nextafter(lo, torch.full_like(lo, float("inf")))
    ties = ((lo.float() + hi.float()) / 2)[torch.isfinite(hi.float())]
    edges = torch.tensor([0.0, -0.0, 2**-14, 2**-24, 2**-25, 3 * 2**-26, 2**-14 - 2**-25, 65504.0, 65519.0,
                          -65519.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8])
    return torch.cat([x, ties, edges])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_like_cast_equals_the_cast_bit_for_bit(dtype):
    x = _values(dtype)
    expected = x.to(dtype).float()
    assert torch.equal(round_like_cast(x, dtype).view(torch.int32), expected.view(torch.int32))  # -0.0 too


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_like_cast_survives_inductor(dtype):
    x = _values(dtype)
    compiled = torch.compile(lambda t: round_like_cast(t, dtype), fullgraph=True)
    assert torch.equal(compiled(x), x.to(dtype).float())


def test_float16_overflow_and_float32_passthrough():
    x = torch.tensor([65520.0, -70000.0, 1.5])
    assert round_like_cast(x, torch.float16).tolist() == [float("inf"), float("-inf"), 1.5]
    y = torch.randn(100)
    assert torch.equal(round_like_cast(y, torch.float32), y)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        round_like_cast(y, torch.int8)


def test_compiled_training_weight_has_the_bits_of_the_op():
    """The whole decomposed weight through Inductor, against the op's reference: every entry equal
    (before the fix, the compiled weight used unrounded scales and flipped the bits of weights
    within a rounding step of a decision boundary)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    a1 = w.abs().reshape(64, 4, 64).amax(-1) * 0.6
    a2 = a1 * 0.45
    expected = train_weight_reference(w, a1, a2, 64, torch.float16)[0]
    compiled = torch.compile(lambda w, a1, a2: train_weight_decomposed(w, a1, a2, 64, torch.float16), fullgraph=True)
    assert torch.equal(compiled(w, a1, a2), expected)
    assert torch.equal(train_weight_decomposed(w, a1, a2, 64, torch.float16), expected)
