"""Dense bit packing of N-bit codes (N = 1..16) into uint8 storage and back, vectorized and exact.

`pack(codes, bits)` packs along the last dimension: the last dim of n codes becomes
ceil(n * bits / 8) bytes, little-endian within the bitstream (bit k of code i sits at stream
position i*bits + k). Leading dimensions are independent rows, so blocks appended later never
rewrite earlier ones.

Layouts the attention kernels read (x is [..., tokens, head_dim]):
- `pack_channels`: keys, one row per token, its head_dim codes packed together
  -> [..., tokens, ceil(head_dim * bits / 8)] (a q.k dot product reads one row).
- `pack_tokens`: values, one row per channel and block of `block` tokens
  -> [..., tokens / block, head_dim, ceil(block * bits / 8)] (p.v reads a block per channel);
  a new block of tokens is a new row, earlier blocks are never touched.
- `as_words`: the same bytes viewed as little-endian int32 words when a row is a whole number of words.
"""
from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    """Bytes used by `n` codes of `bits` bits each."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bit width must be an integer in 1..16, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] in [0, 2**bits) into uint8 [..., packed_length(n, bits)]."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError("codes must be an integer tensor")
    lead, n = codes.shape[:-1], codes.shape[-1]
    nbytes = packed_length(n, bits)
    if codes.numel() == 0:  # no codes (or no rows): reshape(-1, n) below cannot infer a size
        return torch.zeros(*lead, nbytes, dtype=torch.uint8, device=codes.device)
    c = codes.reshape(-1, n).to(torch.int32) & ((1 << bits) - 1)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, a shift-and-sum per byte
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        groups = c.view(c.shape[0], -1, per)
        out = groups[..., 0].clone()
        for k in range(1, per):
            out |= groups[..., k] << (k * bits)
        return out.to(torch.uint8).reshape(*lead, nbytes)
    # General N: 8 codes fill exactly `bits` bytes; code k of a group starts at bit k*bits and spans at
    # most 3 bytes, so every byte of the group is an OR of statically known shifted slices.
    groups = -(-n // 8)
    c = torch.nn.functional.pad(c, (0, groups * 8 - n)).view(c.shape[0], groups, 8)
    columns: list[torch.Tensor | None] = [None] * (bits + 2)
    for k in range(8):
        first, shift = divmod(k * bits, 8)
        word = c[..., k] << shift  # up to 16 + 7 = 23 bits
        for m in range(3):
            part = (word >> (8 * m)) & 0xFF
            columns[first + m] = part if columns[first + m] is None else columns[first + m] | part
    out = torch.stack(columns[:bits], dim=-1)
    return out.reshape(c.shape[0], -1)[:, :nbytes].to(torch.uint8).reshape(*lead, nbytes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., packed_length(n, bits)] -> int64 codes [..., n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed storage must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} codes of {bits} bits")
    lead = packed.shape[:-1]
    if packed.numel() == 0:
        return torch.zeros(*lead, n, dtype=torch.int64, device=packed.device)
    p = packed.reshape(-1, packed.shape[-1])
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        codes = ((p.unsqueeze(-1) >> shifts) & mask).reshape(p.shape[0], -1)[:, :n]
        return codes.to(torch.int64).reshape(*lead, n)
    groups = -(-n // 8)
    g = torch.nn.functional.pad(p, (0, groups * bits - p.shape[-1] + 2)).to(torch.int32)
    g = g[:, : groups * bits].reshape(p.shape[0], groups, bits)
    g = torch.nn.functional.pad(g, (0, 2))
    columns = []
    for k in range(8):
        first, shift = divmod(k * bits, 8)
        word = g[..., first] | (g[..., first + 1] << 8) | (g[..., first + 2] << 16)
        columns.append((word >> shift) & mask)
    codes = torch.stack(columns, dim=-1).to(torch.int64)
    return codes.reshape(p.shape[0], -1)[:, :n].reshape(*lead, n)


def pack_channels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Key layout: codes [..., tokens, head_dim] -> uint8 [..., tokens, packed_length(head_dim, bits)]."""
    return pack(codes, bits)


def unpack_channels(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of `pack_channels` -> int64 [..., tokens, head_dim]."""
    return unpack(packed, bits, head_dim)


def pack_tokens(codes: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Value layout: codes [..., tokens, head_dim] -> uint8 [..., tokens/block, head_dim, packed_length(block, bits)].

    `tokens` must be a whole number of blocks: appends add blocks, they never rewrite one.
    """
    *lead, tokens, dim = codes.shape
    if block < 1 or tokens % block:
        raise ValueError(f"{tokens} tokens are not a whole number of blocks of {block}")
    blocks = codes.reshape(*lead, tokens // block, block, dim).transpose(-1, -2)
    return pack(blocks, bits)


def unpack_tokens(packed: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of `pack_tokens` -> int64 [..., tokens, head_dim]."""
    codes = unpack(packed, bits, block)  # [..., nblocks, head_dim, block]
    *lead, nblocks, dim, _ = codes.shape
    return codes.transpose(-1, -2).reshape(*lead, nblocks * block, dim)


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """View uint8 rows [..., 4k] as little-endian int32 words [..., k] (no copy when contiguous)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] % 4:
        raise ValueError(f"need uint8 rows of a multiple of 4 bytes, got {packed.dtype} rows of {packed.shape[-1]}")
    return packed.contiguous().view(torch.int32)


def from_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `as_words`: int32 [..., k] -> uint8 [..., 4k]."""
    if words.dtype != torch.int32:
        raise ValueError(f"need int32 words, got {words.dtype}")
    return words.contiguous().view(torch.uint8)
