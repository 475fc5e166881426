"""The split-K kernel of per-channel mixed-width nuq blocks (the kvpack presets, kernels/triton_mixed.py) under the
Triton interpreter, against decode-then-attend with the codecs' own decode (the torch reference's path).

Tiny codecs built directly (no calibration): 2 KV heads x 64 channels, widths spread unevenly over heads (so a
head's channels of one width start mid-byte, and RoPE pairs mostly differ in width), per-channel codebooks with
Q-Norm, sparse outliers over all heads (keys) or per head (values), pre-RoPE keys rotated in the kernel.
"""
from __future__ import annotations

import pytest
import torch

from test_triton_interpret import B, DIM, H, INV_FREQ, _check, _decode_then_attend, _positions, _query  # noqa: I001

from kvpack.cache.stream import TokenStream
from kvpack.hf.rope import apply_rope
from kvpack.codecs.nuq import NuqCodec
from kvpack.kernels import triton_decode, triton_mixed
from kvpack.kernels.layout import mixed_view
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _widths(counts: dict[int, int], g: torch.Generator) -> torch.Tensor:
    """Per-channel widths [H * DIM]: counts[w] channels of width w (multiples of 8), shuffled over heads."""
    bits = torch.cat([torch.full((n,), w) for w, n in counts.items()])
    assert bits.numel() == H * DIM
    return bits[torch.randperm(bits.numel(), generator=g)]


def _codecs(key_counts, value_counts, frac: float, span: str, seed: int):
    g = torch.Generator().manual_seed(seed)

    def levels(bits: torch.Tensor) -> torch.Tensor:
        lv = torch.rand(H * DIM, 1 << int(bits.max()), generator=g) * 2 - 1
        return lv / lv.abs().amax(-1, keepdim=True)

    kb, vb = _widths(key_counts, g), _widths(value_counts, g)
    qnorm = torch.stack([1 + 0.1 * torch.rand(H * DIM, generator=g), 0.05 * torch.randn(H * DIM, generator=g)], -1)
    key = NuqCodec(levels(kb), "channel", H, DIM, frac, zero=0.2 * torch.randn(H, DIM, generator=g),
                   scale=1.0 + torch.rand(H, DIM, generator=g), channel_bits=kb, qnorm=qnorm)
    value = NuqCodec(levels(vb), "token", H, DIM, frac, span=span, channel_bits=vb)
    return key, value


def _layer(key, value, tokens: int, blocks, seed: int, head: int = 1, tail: int = 2):
    g = torch.Generator().manual_seed(seed)
    ks, vs = TokenStream(key, head, tail), TokenStream(value, head, tail)
    added = i = 0
    while added < tokens:
        n = min(blocks[i % len(blocks)], tokens - added)
        ks.append(torch.randn(B, H, n, DIM, generator=g) * 1.5)
        vs.append(torch.randn(B, H, n, DIM, generator=g))
        added += n
        i += 1
    return ks, vs


KEYS = {1: 40, 2: 48, 3: 24, 4: 16}
VALUES = {2: 56, 3: 48, 5: 24}  # 5-bit codes: most span two bytes


def test_tables_describe_the_codec():
    """Per head the permuted channels are a permutation with widths ascending; inv inverts it; each channel's levels
    in the compact table are the codec's decoded levels (keys: times scale plus zero)."""
    key, value = _codecs(KEYS, VALUES, 0.02, "all", seed=1)
    ks, vs = _layer(key, value, 9, (9,), seed=1)
    for codec, stream, keys in ((key, ks, True), (value, vs, False)):
        t = triton_mixed.width_tables(codec, mixed_view(stream.body.runs[0], codec), keys)
        assert t is not None and t.slots == len(codec.channel_bits.unique())
        for h in range(H):
            chan = t.meta[h, 0].long()
            assert torch.equal(chan.sort().values, torch.arange(DIM))
            assert torch.equal(t.inv[h].long()[chan], torch.arange(DIM))
            widths = t.meta[h, 1].long() & 15
            assert torch.equal(widths, codec.channel_bits.view(H, DIM)[h, chan])
            assert bool((widths[1:] >= widths[:-1]).all())
            lev = codec.decode_levels.view(H, DIM, -1)[h, chan]
            if keys:
                lev = lev * codec.scale.view(H, DIM)[h, chan, None] + codec.zero.view(H, DIM)[h, chan, None]
            for j in range(DIM):
                first, n = int(t.meta[h, 4, j]), 1 << int(widths[j])
                assert torch.equal(t.levels[h, first:first + n], lev[j, :n])


@pytest.mark.parametrize("span,seed", [("all", 2), ("head", 3)])
def test_mixed_split_k_matches_decode_then_attend(span, seed):
    """Pre-RoPE keys rotated in the kernel (left padding masked), GQA 3 x 1, outliers in keys and values, several
    runs (blocks of 9, 1 and 20 tokens) and splits, exact fp32 dots."""
    key, value = _codecs(KEYS, VALUES, 0.05, span, seed)
    ks, vs = _layer(key, value, 33, (9, 1, 20), seed)
    assert len(ks.body.runs) >= 2
    total = ks.stored
    pos = _positions(total)
    mask = torch.ones(B, 1, 1, total + 4, dtype=torch.bool)
    mask[1, ..., 4:7] = False
    query = _query(1)
    got = triton_decode.stream_attention(ks, vs, key, value, query, mask, DIM ** -0.5, positions=pos,
                                         inv_freq=INV_FREQ, dot16=False, split_tokens=32)
    _check(got, _decode_then_attend(ks, vs, query, DIM ** -0.5, pos, mask), False)


def test_mixed_fp16_dots_causal_post_rope_softcap():
    """fp16 tensor-core operands, 2 query tokens (causal), RoPE scaling; then post-RoPE keys with softcap."""
    key, value = _codecs({1: 64, 2: 64}, {2: 96, 4: 32}, 0.03, "all", seed=4)
    ks, vs = _layer(key, value, 26, (20, 1), seed=4)
    pos = _positions(ks.stored, pad=0)
    query = _query(2)
    got = triton_decode.stream_attention(ks, vs, key, value, query, None, DIM ** -0.5, positions=pos,
                                         inv_freq=INV_FREQ, rope_scaling=1.1, dot16=True, split_tokens=16)
    _check(got, _decode_then_attend(ks, vs, query, DIM ** -0.5, pos, rope_scaling=1.1), True)
    query = _query(1, seed=8)
    got = triton_decode.stream_attention(ks, vs, key, value, query, None, 0.2, softcap=3.0, dot16=False)
    _check(got, _decode_then_attend(ks, vs, query, 0.2, softcap=3.0), False)


def test_mixed_eight_widths_and_8_bit_codes():
    """Every width 1..8 in one codec (8 codes tensors; 8-bit codes, 7-bit ones spanning bytes)."""
    key, value = _codecs({1: 16, 2: 16, 3: 16, 4: 16, 5: 16, 6: 16, 7: 16, 8: 16}, VALUES, 0.02, "all", seed=5)
    ks, vs = _layer(key, value, 11, (6, 1), seed=5)
    query = _query(1, seed=3)
    got = triton_decode.stream_attention(ks, vs, key, value, query, None, 0.1, dot16=False)
    _check(got, _decode_then_attend(ks, vs, query, 0.1), False)


@pytest.mark.parametrize("name,layers", [("kvpack-3bit", (0, 17)), ("kvpack-4bit", (5,))])
def test_shipped_preset_codecs(name, layers):
    """The shipped presets' codecs (SmolLM2: 3 KV heads x 64, 9 query heads, up to 7 widths per codec unevenly over
    heads, Q-Norm, 1% outliers), on activations drawn around each key channel's calibrated range."""
    recipe = Recipe.load(SHIPPED_DIR / name)
    g = torch.Generator().manual_seed(6)
    for layer in layers:
        key, value = recipe.key_codecs[layer], recipe.value_codecs[layer]
        heads, dim = key.heads, key.head_dim
        ks, vs = TokenStream(key, 1, 2), TokenStream(value, 1, 2)
        for n in (9, 1, 14):
            x = torch.randn(1, heads, n, dim, generator=g)
            ks.append(key.zero.view(heads, 1, dim) + key.scale.view(heads, 1, dim) * x)
            vs.append(torch.randn(1, heads, n, dim, generator=g))
        total = ks.stored
        pos = torch.arange(total, dtype=torch.int32)[None] + 3
        inv = 1e5 ** (-torch.arange(0, dim, 2).float() / dim)
        query = torch.randn(1, heads * 3, 1, dim, generator=g)
        got = triton_decode.stream_attention(ks, vs, key, value, query, None, dim ** -0.5, positions=pos,
                                             inv_freq=inv, dot16=False, split_tokens=16)
        k, v = ks.read(torch.float32), vs.read(torch.float32)
        ang = pos.double()[:, :, None] * inv.double()
        emb = torch.cat([ang, ang], -1)
        k = apply_rope(k, emb.cos().float(), emb.sin().float())
        s = query @ k.repeat_interleave(3, 1).transpose(-1, -2) * dim ** -0.5
        want = (torch.softmax(s, -1) @ v.repeat_interleave(3, 1)).transpose(1, 2)
        _check(got, want, False)
