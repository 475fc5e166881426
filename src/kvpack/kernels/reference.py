"""Torch reference for attention over a run of packed blocks: decode a chunk of blocks (or a token range of one
block, cut by the codec) with the layer's own codec (the code path storage uses), rotate keys at their positions,
multiply.

Memory stays bounded by the chunk (`CHUNK_TOKENS` tokens of [B, H, chunk, D] float32), never the whole history;
a block larger than the chunk is decoded a token range at a time when its codec can cut its storage there
(`Codec.slice_tokens`), whole otherwise. Every codec works here; the kernels in cpu.py / triton_*.py must match it.
"""
from __future__ import annotations

from typing import Iterator

import torch

from kvpack.codecs import Codec
from kvpack.hf.rope import apply_rope
from kvpack.kernels.layout import block_chunks

CHUNK_TOKENS = 2048


def decode_range(run, codec: Codec, start: int, stop: int, max_tokens: int | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first run token, x [B, H, n, D] float32) for run tokens start..stop-1, piece by piece (pieces of at
    most `max_tokens` tokens, except a whole block its codec cannot cut)."""
    batch, heads, _, dim = run.block_shape
    for first, enc in block_chunks(run, max_tokens or CHUNK_TOKENS, codec, start, stop):
        x = codec.decode(enc).float()
        blocks, tokens = enc.shape[0] // batch, enc.shape[-2]
        if blocks > 1:
            x = x.reshape(blocks, batch, heads, tokens, dim).permute(1, 2, 0, 3, 4).reshape(batch, heads, -1, dim)
        lo, hi = max(start, first), min(stop, first + x.shape[-2])
        yield lo, x[..., lo - first: hi - first, :]


def _decoded(run, codec: Codec, max_tokens: int | None):
    """Yield (first run token, x [B, H, tokens, D] float32) chunk by chunk over the whole run."""
    return decode_range(run, codec, 0, run.tokens, max_tokens)


def key_scores(run, codec: Codec, q: torch.Tensor, rope, out: torch.Tensor, max_tokens: int | None = None) -> None:
    """out[b, h, g, n] = q[b, h, g] . RoPE(k_n): q [B, H, G, D] fp32, rope cos/sin of the run's tokens (kernels.rope.RopeAt) or None."""
    for start, k in _decoded(run, codec, max_tokens):
        stop = start + k.shape[-2]
        if rope is not None:
            k = apply_rope(k, *rope[start:stop].full())
        out[..., start:stop] = q @ k.transpose(-1, -2)


def value_accum(run, codec: Codec, p: torch.Tensor, out: torch.Tensor, max_tokens: int | None = None) -> None:
    """out[b, h, g] += p[b, h, g, n] @ v_n: p [B, H, G, run tokens] fp32, out [B, H, G, D]."""
    for start, v in _decoded(run, codec, max_tokens):
        out += p[..., start:start + v.shape[-2]] @ v
