"""Dense N-bit packing: exact round trip for N = 1..16, exact byte counts, bit layout, errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.packing import pack, packed_length, unpack

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_BITS = list(range(1, 17))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000])
def test_round_trip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, math.ceil(n * bits / 8))
    assert packed.shape[-1] == packed_length(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([[0, top, top, 0, top, 1 % (top + 1), top - 1 if top else 0]])
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[-1]), codes)
    full = torch.full((5, 11), top)
    assert torch.equal(unpack(pack(full, bits), bits, 11), full)


@st.composite
def code_arrays(draw):
    bits = draw(st.integers(1, 16))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    n = draw(st.integers(0, 70))
    numel = math.prod(lead) * n
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from([torch.int64, torch.int32] + ([torch.int16] if bits < 16 else []) + ([torch.uint8] if bits <= 8 else [])))
    return bits, torch.tensor(values, dtype=torch.int64).reshape(*lead, n).to(dtype)


@given(code_arrays())
@settings(max_examples=200, deadline=None)
def test_round_trip_hypothesis(case):
    bits, codes = case
    packed = pack(codes, bits)
    n = codes.shape[-1]
    assert packed.shape == (*codes.shape[:-1], (n * bits + 7) // 8)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes.to(torch.int64))


def test_bit_layout_little_endian():
    # bit k of code i sits at stream position i*bits + k
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]), 1).tolist() == [1]
    assert pack(torch.tensor([0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [128]
    assert pack(torch.tensor([0b01, 0b10, 0b11, 0b00]), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([0x5, 0xA]), 4).tolist() == [0xA5]
    # 3-bit codes straddle byte boundaries: 7,7,7 -> 9 ones then zero padding
    assert pack(torch.tensor([7, 7, 7]), 3).tolist() == [0xFF, 0x01]
    assert pack(torch.tensor([0xABCD]), 16).tolist() == [0xCD, 0xAB]


def test_rows_are_independent():
    # appending a row never changes the bytes of earlier rows
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 8, (4, 13), generator=g)
    b = torch.cat([a, torch.randint(0, 8, (2, 13), generator=g)])
    assert torch.equal(pack(b, 3)[:4], pack(a, 3))


@pytest.mark.parametrize("n,bits,expected", [(0, 4, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (128, 3, 48), (5, 16, 10), (7, 5, 5)])
def test_packed_length(n, bits, expected):
    assert packed_length(n, bits) == expected


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, "4", None])
def test_bad_bits(bits):
    codes = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="bit width"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="bit width"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_codes_rejected(dtype):
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(8, dtype=dtype), 4)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float32])
def test_packed_must_be_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(4, dtype=dtype), 4, 8)


def test_unpack_length_mismatch():
    packed = pack(torch.zeros(10, dtype=torch.int64), 3)  # 4 bytes
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack(packed, 3, 12)  # would need 5 bytes
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack(packed, 3, 5)  # would need 2 bytes
