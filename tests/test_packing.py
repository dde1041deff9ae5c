"""Bit packing: exact round trips (property-based) and the documented bit order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbllm_compile.reference.packing import pack_bits, pack_planes, unpack_bits, unpack_planes


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_exact(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, -(-cols // 8))
    assert torch.equal(unpack_bits(packed, cols), bits)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_planes_round_trip(rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    b1 = torch.randint(0, 2, (rows, groups * 64), generator=g, dtype=torch.uint8)
    b2 = torch.randint(0, 2, (rows, groups * 64), generator=g, dtype=torch.uint8)
    packed = pack_planes(b1, b2)
    assert packed.shape == (2, rows, groups * 8)
    u1, u2 = unpack_planes(packed, groups * 64)
    assert torch.equal(u1, b1) and torch.equal(u2, b2)


def test_bit_order_is_lsb_first():
    bits = torch.zeros(16, dtype=torch.uint8)
    bits[0] = 1  # -> byte 0, bit 0
    bits[7] = 1  # -> byte 0, bit 7
    bits[10] = 1  # -> byte 1, bit 2
    assert pack_bits(bits).tolist() == [0b10000001, 0b00000100]


def test_bool_input_and_padding():
    bits = torch.tensor([True, False, True])
    assert pack_bits(bits).tolist() == [0b101]
    assert unpack_bits(pack_bits(bits), 3).tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0, 2]), "values in"),
        (torch.tensor([0.0, 1.0]), "integer or bool"),
    ],
    ids=["value-2", "float"],
)
def test_pack_rejects_non_bits(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pack_bits(bad)


def test_unpack_rejects_too_many_bits():
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)
