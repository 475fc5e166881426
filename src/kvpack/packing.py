"""Dense bit packing of N-bit codes (N = 1..16) into uint8 storage and back, vectorized and exact.

`pack(codes, bits)` packs along the last dimension: the last dim of n codes becomes
ceil(n * bits / 8) bytes, little-endian within the bitstream (bit k of code i sits at stream
position i*bits + k). Leading dimensions are independent rows, so blocks appended later never
rewrite earlier ones: keys are packed as [.., channels-of-a-token-block] rows, values along tokens.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def packed_length(n: int, bits: int) -> int:
    """Bytes used by `n` codes of `bits` bits each."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bit width must be an integer in 1..16, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] in [0, 2**bits) into uint8 [..., packed_length(n, bits)]."""
    _check_bits(bits)
    if codes.dtype.is_floating_point:
        raise TypeError("codes must be an integer tensor")
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = _BIT_WEIGHTS.to(codes.device)
    return (stream.reshape(*lead, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., packed_length(n, bits)] -> int64 codes [..., n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed storage must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} codes of {bits} bits")
    lead = packed.shape[:-1]
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)[..., : n * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (stream.reshape(*lead, n, bits).to(torch.int64) * weights).sum(-1)
