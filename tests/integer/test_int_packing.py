"""Bit packing at 1-8 bits: exact round trip and exact size."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_qasr.export.packing import code_range, pack_codes, packed_nbytes, unpack_codes


@st.composite
def codes(draw):
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans()) if bits > 1 else False
    symmetric = draw(st.booleans()) if signed else False
    qmin, qmax = code_range(bits, signed, symmetric)
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.integers(qmin, qmax), min_size=n, max_size=n))
    return bits, qmin, torch.tensor(values, dtype=torch.int64).reshape(shape)


@settings(max_examples=200, deadline=None)
@given(codes())
def test_pack_unpack_round_trip(case):
    bits, qmin, q = case
    packed = pack_codes(q, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(q.numel(), bits)
    back = unpack_codes(packed, bits, qmin, q.shape)
    fits = int(q.min()) >= -128 and int(q.max()) <= 127
    assert back.dtype == (torch.int8 if fits else torch.int16) and torch.equal(back.long(), q)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_packed_size_is_n_bits_over_8(bits):
    q = torch.randint(0, 2 ** bits, (1000, 13))
    assert pack_codes(q, bits, 0).numel() == (13000 * bits + 7) // 8


def test_known_layout_lsb_first():
    # 3-bit codes 1, 2, 7 -> bits 100 010 111 (LSB first) -> byte0 = 0b11010001, byte1 = 0b00000001
    assert pack_codes(torch.tensor([1, 2, 7]), 3, 0).tolist() == [0b11010001, 0b1]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 4]), 2, 0)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 9, 0)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 0, (7,))
