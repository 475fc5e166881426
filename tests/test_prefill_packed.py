"""Prefill chunks and multi-token steps over packed storage (kvpack.kernels.dispatch.blockwise_attention).

Attention for calls of more than `max_queries` query tokens reads the stored history window by window
(never the whole decoded history) and must give the numbers of decode-then-attend (`packed_attention=False`).
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from test_attention import RECIPES, _decoded_attention, _filled_cache, nuq_recipe
from kvpack.cache.cache import CompressedCache
from kvpack.cache.layer import CompressedLayer
from kvpack.cache.stream import TokenStream
from kvpack.codecs import Fp16Codec, NormalFloatCodec, UniformCodec
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import text_config
from kvpack.kernels import dispatch, reference
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PREFILL_RECIPES = {
    "nuq4": RECIPES["nuq4"],
    "nuq3-headcb-vspan-head": RECIPES["nuq3-headcb-vspan-head"],
    "rvq": RECIPES["rvq"],
    "int4": RECIPES["int4-baseline"],
    "kivi": lambda m: Recipe.baseline("kivi-4:recent4:g8", text_config(m.config).num_hidden_layers),
}


@pytest.fixture(params=["fused", "torch"])
def window_path(request, monkeypatch):
    """Each way blockwise_attention attends a window on the CPU: torch's fused flash kernel, or the torch loop."""
    if request.param == "fused" and dispatch._FLASH_CPU is None:
        pytest.skip("this torch has no fused CPU flash-attention kernel")
    monkeypatch.setattr(dispatch, "FUSED_CPU", request.param == "fused")
    return request.param


def _ids(batch: int, tokens: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 120, (batch, tokens), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    if pad:
        ids[-1, :pad], mask[-1, :pad] = 2, 0
    return ids, mask


def _stream_logits(model, recipe, ids, mask, chunks: list[int], packed: bool, window: int = 16, block_tokens=128):
    """Feed ids in chunks of the given sizes through a fresh cache; logits [B, tokens, vocab] and the cache."""
    cache = CompressedCache(model, recipe, packed_attention=packed, block_tokens=block_tokens)
    if packed:
        cache.packed.window_tokens = window
    out, start = [], 0
    with torch.no_grad():
        for size in chunks:
            stop = start + size
            out.append(model(ids[:, start:stop], attention_mask=mask[:, :stop], **cache_kwargs(cache)).logits)
            start = stop
    return torch.cat(out, 1), cache


def _check(model, recipe, chunks, batch=1, pad=0, window=16, block_tokens=128):
    ids, mask = _ids(batch, sum(chunks), pad)
    want, _ = _stream_logits(model, recipe, ids, mask, chunks, packed=False, block_tokens=block_tokens)
    got, cache = _stream_logits(model, recipe, ids, mask, chunks, packed=True, window=window, block_tokens=block_tokens)
    assert cache.packed.blockwise_calls > 0
    real = mask.bool()  # left-padded positions attend to nothing real: their logits are not compared
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    return cache


@pytest.mark.parametrize("kind", list(PREFILL_RECIPES))
@pytest.mark.parametrize("chunk", [1, 5, 17, 64])
def test_chunked_prefill_matches_decode_path(kind, chunk):
    """A 64-token prompt (one big block) then chunks of 1/5/17/64 tokens over a multi-block history, GQA,
    batch 2 with left padding, windows of 16 tokens (blocks cut by token range)."""
    model = make_tiny_model("llama")
    cache = _check(model, PREFILL_RECIPES[kind](model), [64] + [chunk] * min(max(2, 40 // chunk), 6), batch=2, pad=5)
    layer = cache.layers[0]
    assert layer.k.body.tokens > 16  # the history really had encoded blocks to read


@pytest.mark.parametrize("kind", list(PREFILL_RECIPES))
def test_torch_window_loop_matches_decode_path(kind, monkeypatch):
    """The same with the torch loop per window (what runs off the CPU or with softcap)."""
    monkeypatch.setattr(dispatch, "FUSED_CPU", False)
    model = make_tiny_model("llama")
    cache = _check(model, PREFILL_RECIPES[kind](model), [40, 17, 17], batch=2, pad=5)
    layer = cache.layers[0]
    assert layer.k.body.tokens > 16  # the history really had encoded blocks to read


@pytest.mark.parametrize("arch,attn", [("gemma2", "eager"), ("gemma3", "sdpa")])
@pytest.mark.parametrize("kind", ["nuq4", "rvq", "kivi"])
def test_sliding_window_layers(arch, attn, kind, window_path):
    """Gemma2/3 (sliding window 16, softcap for gemma2): chunks longer than the window free blocks on the way."""
    model = make_tiny_model(arch, attn)
    cache = _check(model, PREFILL_RECIPES[kind](model), [24, 17, 17, 20, 3], block_tokens=8, window=8)
    assert cache.layers[0].is_sliding and cache.layers[0].first_slot > 0


@pytest.mark.parametrize("window", [1, 7, 64, 4096])
def test_window_sizes_agree(window):
    """Any window size gives the same attention, down to one token per window."""
    model = make_tiny_model("qwen2")
    _check(model, RECIPES["nuq2-csc-keys"](model), [33, 20, 18], window=window)


@pytest.mark.parametrize("masking", ["none", "bool", "float", "softcap"])
def test_blockwise_layer_attention_matches_decoded(masking, window_path, monkeypatch):
    """One layer, 19 queries: blockwise == eager attention over the decoded history; a fully masked query row
    gives 0, not NaN."""
    model = make_tiny_model("llama")
    cache = _filled_cache(model, RECIPES["nuq4"](model), chunk=9)
    layer = cache.layers[1]
    total, q = layer.k.stored, 19
    query = torch.randn(2, 4, q, 16, generator=torch.Generator().manual_seed(7))
    mask, softcap = None, None
    if masking == "bool":
        mask = torch.rand(2, 1, q, total, generator=torch.Generator().manual_seed(8)) > 0.3
        mask[..., 0] = True
        mask[1, 0, 4] = False  # a row that sees nothing
    elif masking == "float":
        mask = torch.randn(2, 4, q, total, generator=torch.Generator().manual_seed(9))
    elif masking == "softcap":
        softcap = 2.0
    want_mask = torch.ones(q, total, dtype=torch.bool).tril(total - q) if mask is None else mask
    want = _decoded_attention(layer, cache, query, want_mask, softcap)
    fused_calls = []
    if dispatch._FLASH_CPU is not None:
        original = dispatch._FLASH_CPU
        monkeypatch.setattr(dispatch, "_FLASH_CPU", lambda *a, **k: fused_calls.append(1) or original(*a, **k))
    got = dispatch.blockwise_attention(layer, query, mask, softcap=softcap, rope=cache.packed.rope, window_tokens=10)
    if masking == "bool":
        assert torch.equal(got[1, 4], torch.zeros_like(got[1, 4])) and torch.isnan(want[1, 4]).all()
        want[1, 4] = 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bool(fused_calls) == (window_path == "fused" and masking != "softcap")  # softcap: the torch loop


def test_prefill_never_decodes_the_whole_history(monkeypatch):
    """With packed attention a chunked prefill never reads every stored token at once, and every piece decoded
    has at most `window_tokens` tokens, including a 64-token prompt block split by token range."""
    model = make_tiny_model("llama")
    recipe = RECIPES["nuq4"](model)
    ids, mask = _ids(1, 120)
    cache = CompressedCache(model, recipe, block_tokens=128)
    cache.packed.window_tokens = 12

    def forbidden(*args, **kwargs):
        raise AssertionError("the whole history was decoded")

    monkeypatch.setattr(TokenStream, "read", forbidden)
    monkeypatch.setattr(CompressedLayer, "read_all", forbidden)
    seen = []
    for codec in (recipe.key_codecs[0], recipe.value_codecs[0]):
        original = type(codec).decode

        def spy(self, enc, original=original):
            seen.append(enc.shape[0] * enc.shape[-2])  # batch 1: blocks * tokens
            return original(self, enc)

        monkeypatch.setattr(type(codec), "decode", spy)
    with torch.no_grad():
        for start, stop in ((0, 64), (64, 100), (100, 120)):
            model(ids[:, start:stop], **cache_kwargs(cache))
    assert cache.packed.blockwise_calls == 3 * 2 and cache.layers[0].k.body.tokens >= 64
    assert seen and max(seen) <= 12


def test_codec_without_cuts_decodes_its_block_whole():
    """KIVI keys (token groups) cannot be cut inside a block: the window read decodes that block whole and trims."""
    codec = UniformCodec(2, "channel", 8)
    x = torch.randn(1, 2, 32, 16)
    enc = codec.encode(x)
    assert codec.slice_tokens(enc, 8, 16) is None
    stream = TokenStream(codec, 0, 0)
    stream.append(x)
    torch.testing.assert_close(stream.read_range(5, 21), codec.decode(enc)[..., 5:21, :], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fp16", "int3-token", "nf4-token", "nuq-keys", "nuq-values", "rvq"])
def test_slice_tokens_ranges(name):
    """slice_tokens(enc, start, stop) decodes to exactly the tokens start..stop-1 of the block, for byte-aligned
    ranges; None where the packed codes do not start on a byte."""
    model = make_tiny_model("llama")
    rvq = RECIPES["rvq"](model).key_codecs[0]
    nuq = nuq_recipe(model, 3, 0.1)
    codec = {"fp16": Fp16Codec(), "int3-token": UniformCodec(3, "token", 8), "nf4-token": NormalFloatCodec(4),
             "nuq-keys": nuq.key_codecs[0], "nuq-values": nuq.value_codecs[0], "rvq": rvq}[name]
    x = torch.randn(2, 2, 24, 16, generator=torch.Generator().manual_seed(3)) * 2
    enc = codec.encode(x)
    full = codec.decode(enc)
    for start, stop in ((0, 24), (0, 5), (4, 11), (13, 24), (23, 24)):
        part = codec.slice_tokens(enc, start, stop)
        assert part is not None and part.shape == (2, 2, stop - start, 16)
        assert torch.equal(codec.decode(part), full[..., start:stop, :]), (start, stop)
    with pytest.raises(ValueError):
        codec.slice_tokens(enc, 5, 30)


def test_slice_tokens_needs_byte_aligned_codes():
    """3-bit codes of 4 channels: token 1 starts at bit 12 (no cut), token 2 at bit 24 (a cut)."""
    codec = UniformCodec(3, "token")
    x = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(1))
    enc = codec.encode(x)
    assert codec.slice_tokens(enc, 1, 4) is None and codec.slice_tokens(enc, 2, 3) is None
    assert torch.equal(codec.decode(codec.slice_tokens(enc, 2, 6)), codec.decode(enc)[..., 2:, :])
    assert torch.equal(codec.decode(codec.slice_tokens(enc, 0, 4)), codec.decode(enc)[..., :4, :])


def test_windows_end_on_block_boundaries():
    assert dispatch.windows([0, 1, 65, 129, 140], 140, 100) == [(0, 65), (65, 140)]
    assert dispatch.windows([0, 1, 129], 129, 50) == [(0, 1), (1, 51), (51, 101), (101, 129)]
    assert dispatch.windows([0, 10], 10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_reference_splits_a_big_block(monkeypatch):
    """Decode steps on the torch reference path read a 64-token prompt block a token range at a time."""
    model = make_tiny_model("llama")
    cache = _filled_cache(model, RECIPES["rvq"](model), batch=1, tokens=64)  # one forward: one big block
    layer = cache.layers[0]
    assert [r.count for r in layer.k.body.runs] == [1] and layer.k.body.tokens >= 60
    codec = layer.key_codec
    seen, original = [], type(codec).decode
    monkeypatch.setattr(type(codec), "decode", lambda self, enc: seen.append(enc.shape[-2]) or original(self, enc))
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 8)
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(2))
    out = dispatch.layer_attention(layer, query, None, backend="torch", rope=cache.packed.rope)
    assert max(seen) <= 8 and len(seen) >= 8
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 2048)
    torch.testing.assert_close(out, dispatch.layer_attention(layer, query, None, backend="torch", rope=cache.packed.rope),
                               rtol=1e-6, atol=1e-6)
