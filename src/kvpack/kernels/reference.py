"""Torch reference for attention over a run of packed blocks: decode a chunk of whole blocks with the
layer's own codec (the code path storage uses), rotate keys at their positions, multiply.

Memory stays bounded by the chunk (`CHUNK_TOKENS` tokens of [B, H, chunk, D] float32), never the
whole history. Every codec works here; the kernels in cpu.py / triton_*.py must match it.
"""
from __future__ import annotations

import torch

from kvpack.codecs import Codec
from kvpack.hf.rope import apply_rope
from kvpack.kernels.layout import block_chunks

CHUNK_TOKENS = 2048


def _decoded(run, codec: Codec, max_tokens: int):
    """Yield (first run token, x [B, H, tokens, D] float32) chunk by chunk."""
    batch, heads, tokens, dim = run.block_shape
    for start, enc in block_chunks(run, max_tokens or CHUNK_TOKENS):
        x = codec.decode(enc).float()
        blocks = enc.shape[0] // batch
        if blocks > 1:
            x = x.reshape(blocks, batch, heads, tokens, dim).permute(1, 2, 0, 3, 4).reshape(batch, heads, -1, dim)
        yield start, x


def key_scores(run, codec: Codec, q: torch.Tensor, rope, out: torch.Tensor, max_tokens: int | None = None) -> None:
    """out[b, h, g, n] = q[b, h, g] . RoPE(k_n): q [B, H, G, D] fp32, rope a RopeSlice of the run's tokens or None."""
    for start, k in _decoded(run, codec, max_tokens):
        stop = start + k.shape[-2]
        if rope is not None:
            k = apply_rope(k, *rope[start:stop].full())
        out[..., start:stop] = q @ k.transpose(-1, -2)


def value_accum(run, codec: Codec, p: torch.Tensor, out: torch.Tensor, max_tokens: int | None = None) -> None:
    """out[b, h, g] += p[b, h, g, n] @ v_n: p [B, H, G, run tokens] fp32, out [B, H, G, D]."""
    for start, v in _decoded(run, codec, max_tokens):
        out += p[..., start:start + v.shape[-2]] @ v
