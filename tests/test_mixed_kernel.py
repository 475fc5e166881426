"""The C++ kernel for NuqCodec with per-channel bit widths (per-channel allocation, the kvpack presets) reads the
packed width groups exactly as the torch reference decodes them: keys (pre-RoPE, per channel, outliers over all
heads) and values (per token, outliers per head or over all heads)."""
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_mixed_recipe, torch_threads

from kvpack.cache.cache import CompressedCache
from kvpack.cache.stream import TokenStream
from kvpack.codecs.nuq import NuqCodec
from kvpack.hf.attention import cache_kwargs
from kvpack.kernels import cpu, dispatch
from kvpack.kernels.reference import decode_range

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["kvquant-3bit-1pct:alloc-global:fisher-s2", "kvquant-2bit:alloc-tensor:vspan-head",
                                  "kvquant-4bit-1pct:alloc-global:qnorm:vspan-head"])
@torch.no_grad()
def test_mixed_width_kernel_equals_the_torch_reference(name, mixed_calib_text):
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model, tok, recipe = tiny_mixed_recipe(name, mixed_calib_text)
    codecs = recipe.key_codecs + recipe.value_codecs
    assert any(len(set(c.channel_bits.tolist())) > 1 for c in codecs)  # widths really differ
    for c in codecs:  # every width holds a multiple of 8 channels per tensor
        assert all(int((c.channel_bits == w).sum()) % 8 == 0 for w in c.channel_bits.unique())
    ids = torch.randint(3, 120, (1, 48), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, recipe, block_tokens=8)
    model(ids[:, :32], **cache_kwargs(cache))
    for t in range(32, 44):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    for codec in codecs:  # the C++ encoder (cache appends) writes the bytes torch's encode writes
        for tokens in (1, 7):
            x = torch.randn(2, codec.heads, tokens, 16, generator=torch.Generator().manual_seed(tokens)) * 3
            fast, ref = cpu.nuq_encode(codec, x), codec.encode(x)
            assert fast is not None and set(fast.tensors) == set(ref.tensors)
            for key, t in ref.tensors.items():
                assert fast.tensors[key].dtype == t.dtype and torch.equal(fast.tensors[key], t), key
    for layer in cache.layers:
        for queries in (1, 3):
            q = torch.randn(1, model.config.num_attention_heads, queries, 16, generator=torch.Generator().manual_seed(2))
            paths = []
            ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
            got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope, paths=paths)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            assert paths == [("layer", "cpu")]


def test_mixed_width_blocks_cut_per_token_when_byte_aligned():
    """Widths in multiples of 8 channels keep every token's codes on byte boundaries: a block cuts per token."""

    heads, dim = 2, 16
    bits = torch.tensor([3] * 8 + [2] * 16 + [5] * 8)
    levels = torch.linspace(-1, 1, 32).expand(heads * dim, -1)
    codec = NuqCodec(levels, "channel", heads, dim, zero=torch.zeros(heads, dim), scale=torch.ones(heads, dim),
                     channel_bits=bits)
    x = torch.rand(1, heads, 12, dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = codec.encode(x)
    part = codec.slice_tokens(enc, 3, 9)
    assert part is not None and part.shape == (1, heads, 6, dim)
    torch.testing.assert_close(codec.decode(part), codec.decode(enc)[..., 3:9, :])
    odd = NuqCodec(torch.linspace(-1, 1, 8).expand(heads * dim, -1), "channel", heads, dim, zero=torch.zeros(heads, dim), scale=torch.ones(heads, dim),
                   channel_bits=torch.tensor([3] * 3 + [2] * 29))
    assert odd.slice_tokens(odd.encode(x), 3, 9) is None  # 3 x 3 bits per token: not byte-aligned


@pytest.mark.parametrize("block_tokens,threads", [(16, 1), (64, 2)])
@torch.no_grad()
def test_mixed_width_kernel_whole_vector_blocks(block_tokens, threads, mixed_calib_text):
    """Blocks holding whole vectors of 16 tokens take the kernels' fast tile path (AVX-512: codes unpacked and
    transposed 16 tokens at a time); the run's last tile is partial; split over threads the value partials merge."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model, tok, recipe = tiny_mixed_recipe("kvquant-3bit-1pct:alloc-global:fisher-s2", mixed_calib_text)
    ids = torch.randint(3, 120, (2, 200), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache(model, recipe, block_tokens=block_tokens)
    model(ids[:, :180], **cache_kwargs(cache))
    for t in range(180, 183):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    with torch_threads(threads):
        for layer in cache.layers:
            q = torch.randn(2, model.config.num_attention_heads, 2, 16, generator=torch.Generator().manual_seed(4))
            paths = []
            ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
            got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope, paths=paths)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            assert paths == [("layer", "cpu")]



EVERY_WIDTH = {1: 40, 2: 40, 3: 40, 4: 40, 5: 40, 6: 40, 7: 8, 8: 8}
WIDE_ROWS = {6: 96, 3: 128, 2: 32}  # 72 and 48 bytes a token: rows read by word transposes, 72 in two of them


@pytest.mark.parametrize("tokens,threads,counts", [(200, 1, EVERY_WIDTH), (77, 2, EVERY_WIDTH), (200, 1, WIDE_ROWS)])
@torch.no_grad()
def test_mixed_width_kernel_every_width_in_long_groups(tokens, threads, counts):
    """Groups of every width 1..8, most longer than the run of members whose shifts repeat (decoded with
    compile-time shifts on AVX-512) and ending in a shorter tail, keys with outliers over all heads, values with
    outliers per head; and groups whose rows of codes are short (read by byte permutes on AVX-512) or long (by word
    transposes): the C++ kernel equals the torch reference."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    heads, dim = 2, 128
    g = torch.Generator().manual_seed(5)
    bits = torch.cat([torch.full((n,), w) for w, n in counts.items()])
    widths = [bits[torch.randperm(heads * dim, generator=g)] for _ in range(2)]

    def levels(b: torch.Tensor) -> torch.Tensor:
        return (torch.rand(heads * dim, 1 << int(b.max()), generator=g) * 2 - 1).sort(-1).values

    key = NuqCodec(levels(widths[0]), "channel", heads, dim, 0.02, zero=0.1 * torch.randn(heads, dim, generator=g),
                   scale=1 + torch.rand(heads, dim, generator=g), span="all", channel_bits=widths[0])
    value = NuqCodec(levels(widths[1]), "token", heads, dim, 0.02, span="head", channel_bits=widths[1])
    layer = SimpleNamespace(k=TokenStream(key, 1, 2), v=TokenStream(value, 1, 2), key_codec=key, value_codec=value,
                            layer_idx=0, first_slot=0)
    for n in (tokens - 9, 9):  # a prompt and a second block
        layer.k.append(torch.randn(1, heads, n, dim, generator=g) * 2)
        layer.v.append(torch.randn(1, heads, n, dim, generator=g))
    with torch_threads(threads):
        q = torch.randn(1, 3 * heads, 1, dim, generator=g)
        paths = []
        ref = dispatch.layer_attention(layer, q, backend="torch")
        got = dispatch.layer_attention(layer, q, backend="auto", paths=paths)
        assert paths == [("layer", "cpu")]
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)



@pytest.mark.parametrize("batch,blocks", [(1, (70, 1, 1, 1)), (2, (8,))])
@torch.no_grad()
def test_mixed_decode_equals_the_codec_decode(batch, blocks):
    """The C++ decoder of a mixed-width run (prefill chunks read the cache through it) writes exactly what the
    codec's torch decode writes, for keys (Q-Norm, outliers over all heads) and values (outliers per head or over all
    heads), any token range, one-token blocks read as one block and blocks of several tokens."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    heads, dim = 2, 64
    g = torch.Generator().manual_seed(7)
    counts = {1: 24, 2: 32, 3: 40, 4: 16, 5: 8, 6: 8}
    bits = torch.cat([torch.full((n,), w) for w, n in counts.items()])
    widths = [bits[torch.randperm(heads * dim, generator=g)] for _ in range(3)]

    def levels(b: torch.Tensor) -> torch.Tensor:
        return (torch.rand(heads * dim, 1 << int(b.max()), generator=g) * 2 - 1).sort(-1).values

    qnorm = torch.stack([1 + 0.1 * torch.rand(heads * dim, generator=g), 0.05 * torch.randn(heads * dim, generator=g)], -1)
    codecs = [NuqCodec(levels(widths[0]), "channel", heads, dim, 0.03, zero=0.1 * torch.randn(heads, dim, generator=g),
                       scale=1 + torch.rand(heads, dim, generator=g), span="all", channel_bits=widths[0], qnorm=qnorm),
              NuqCodec(levels(widths[1]), "token", heads, dim, 0.03, span="all", channel_bits=widths[1]),
              NuqCodec(levels(widths[2]), "token", heads, dim, 0.03, span="head", channel_bits=widths[2])]
    for codec in codecs:
        stream = TokenStream(codec, 0, 0)
        for n in blocks:
            stream.append(torch.randn(batch, heads, n, dim, generator=g) * 2)
        for run in stream.body.runs:
            ranges = [(0, run.tokens), (3, run.tokens - 2), (run.tokens - 1, run.tokens)]
            for start, stop in [(a, b) for a, b in ranges if 0 <= a < b]:
                fast = cpu.mixed_decode(run, codec, start, stop)
                assert fast is not None
                ref = torch.cat([x for _, x in decode_range(run, codec, start, stop)], dim=-2)
                assert torch.equal(fast, ref), (codec.axis, codec.span, start, stop)
