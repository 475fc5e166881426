"""The C++ kernel for NuqCodec with per-channel bit widths (per-channel allocation, the kvpack presets) reads the
packed width groups exactly as the torch reference decodes them: keys (pre-RoPE, per channel, outliers over all
heads) and values (per token, outliers per head or over all heads)."""
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import kvpack
from kvpack.cache.cache import CompressedCache
from kvpack.hf.attention import cache_kwargs
from kvpack.kernels import cpu, dispatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["kvquant-3bit-1pct:alloc-global:fisher-s2", "kvquant-2bit:alloc-tensor:vspan-head",
                                  "kvquant-4bit-1pct:alloc-global:qnorm:vspan-head"])
@torch.no_grad()
def test_mixed_width_kernel_equals_the_torch_reference(name, mixed_calib_text):
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    recipe = kvpack.calibrate(model, tok, name, data=str(mixed_calib_text), windows=3, seqlen=64, progress=False)
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
    from kvpack.codecs.nuq import NuqCodec

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
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    recipe = kvpack.calibrate(model, tok, "kvquant-3bit-1pct:alloc-global:fisher-s2", data=str(mixed_calib_text), windows=3,
                              seqlen=64, progress=False)
    ids = torch.randint(3, 120, (2, 200), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache(model, recipe, block_tokens=block_tokens)
    model(ids[:, :180], **cache_kwargs(cache))
    for t in range(180, 183):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layer in cache.layers:
            q = torch.randn(2, model.config.num_attention_heads, 2, 16, generator=torch.Generator().manual_seed(4))
            paths = []
            ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
            got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope, paths=paths)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            assert paths == [("layer", "cpu")]
    finally:
        torch.set_num_threads(before)
