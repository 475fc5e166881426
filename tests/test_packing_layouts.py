"""Packing for the cache and kernels: exact round trips for every N (hypothesis), the key (along
channels) and value (along tokens, in blocks) layouts, int32 word views, appends never rewriting."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs import packing

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), rows=st.integers(1, 4), n=st.integers(0, 80), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_any_width(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = packing.pack(codes, bits)
    assert packed.shape == (rows, packing.packed_length(n, bits))
    assert torch.equal(packing.unpack(packed, bits, n), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_bitstream_is_little_endian(bits, n, seed):
    """Bit k of code i is stream bit i*bits + k: compare with a pure-Python reference."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    stream = 0
    for i, c in enumerate(codes.tolist()):
        stream |= c << (i * bits)
    expected = list(stream.to_bytes(packing.packed_length(n, bits), "little"))
    assert packing.pack(codes, bits).tolist() == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_key_layout_packs_each_token_along_channels(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 10, 64))
    packed = packing.pack_channels(codes, bits)
    assert packed.shape == (2, 3, 10, 64 * bits // 8)
    assert torch.equal(packing.unpack_channels(packed, bits, 64), codes)
    # token t's row depends on token t only
    assert torch.equal(packed[:, :, 4], packing.pack(codes[:, :, 4], bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 11, 16])
@pytest.mark.parametrize("block", [8, 32])
def test_value_layout_packs_channels_along_tokens_in_blocks(bits, block):
    codes = torch.randint(0, 1 << bits, (1, 3, 4 * block, 16))
    packed = packing.pack_tokens(codes, bits, block)
    assert packed.shape == (1, 3, 4, 16, packing.packed_length(block, bits))
    assert torch.equal(packing.unpack_tokens(packed, bits, block), codes)
    # appending a block adds a row and leaves the earlier blocks' bytes untouched
    more = torch.cat([codes, torch.randint(0, 1 << bits, (1, 3, block, 16))], dim=-2)
    assert torch.equal(packing.pack_tokens(more, bits, block)[:, :, :4], packed)


def test_value_layout_needs_whole_blocks():
    with pytest.raises(ValueError, match="whole number of blocks"):
        packing.pack_tokens(torch.zeros(1, 1, 10, 4, dtype=torch.int64), 4, 8)


def test_words_view_round_trip():
    codes = torch.randint(0, 16, (3, 64))
    packed = packing.pack(codes, 4)  # 32 bytes per row
    words = packing.as_words(packed)
    assert words.dtype == torch.int32 and words.shape == (3, 8)
    # little-endian: the first word's low nibble is code 0
    assert int(words[0, 0]) & 0xF == int(codes[0, 0])
    assert torch.equal(packing.from_words(words), packed)
    with pytest.raises(ValueError):
        packing.as_words(packed[:, :3])


def test_errors():
    with pytest.raises(ValueError):
        packing.pack(torch.zeros(3, dtype=torch.int64), 17)
    with pytest.raises(TypeError):
        packing.pack(torch.zeros(3), 4)
    with pytest.raises(ValueError):
        packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)
