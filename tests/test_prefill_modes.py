"""What a prefill chunk attends in a CompressedCache, and the decoded path for prompt-sized chunks.

prefill="exact": a multi-token chunk attends its own keys/values unquantized (serving engines' prefill), so a
first prefill gives the fp16 logits exactly, while "stored" (the default) reads them back quantized. Either way the
cache stores the same bits. decoded_chunk_tokens: chunks over that many stored tokens or fewer decode the history
and run the model's attention, with the numbers of the packed blockwise path.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_model
from kvpack.cache.cache import CompressedCache
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import text_config
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", vocab_size=128)


def _recipe(model, name: str = "int2") -> Recipe:
    return Recipe.baseline(name, text_config(model.config).num_hidden_layers)


def _ids(tokens: int) -> torch.Tensor:
    return torch.randint(3, 120, (1, tokens), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _logits(model, cache, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    out, start = [], 0
    for size in chunks:
        out.append(model(ids[:, start:start + size], **cache_kwargs(cache), use_cache=True).logits)
        start += size
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ["int2", "kivi-2:recent4:g8"])
def test_exact_prefill_gives_the_fp16_logits_and_stores_the_same_bits(model, name):
    ids = _ids(64)
    fp16 = _logits(model, DynamicCache(config=model.config), ids, [64])
    exact_cache = CompressedCache(model, _recipe(model, name), prefill="exact")
    stored_cache = CompressedCache(model, _recipe(model, name))
    exact = _logits(model, exact_cache, ids, [64])
    stored = _logits(model, stored_cache, ids, [64])
    torch.testing.assert_close(exact, fp16, rtol=1e-5, atol=1e-5)
    assert (stored - fp16).abs().max() > 1e-2  # the stored prefill reads its own keys/values back at 2 bits
    # layer 0 sees the same inputs in both modes, so it stores the same bits
    torch.testing.assert_close(exact_cache.layers[0].k.read(torch.float32), stored_cache.layers[0].k.read(torch.float32))
    assert exact_cache.get_seq_length() == stored_cache.get_seq_length() == 64


def test_exact_second_chunk_attends_the_stored_history(model):
    """A later exact chunk reads the history back from storage (2-bit here), so only the first chunk is fp16's."""
    ids = _ids(48)
    recipe = _recipe(model)
    chunked = _logits(model, CompressedCache(model, recipe, prefill="exact"), ids, [32, 16])
    fp16 = _logits(model, DynamicCache(config=model.config), ids, [48])
    torch.testing.assert_close(chunked[:, :32], fp16[:, :32], rtol=1e-5, atol=1e-5)
    assert (chunked[:, 32:] - fp16[:, 32:]).abs().max() > 1e-2


def test_unknown_prefill_mode_is_refused(model):
    with pytest.raises(ValueError, match="prefill"):
        CompressedCache(model, _recipe(model), prefill="fast")


@pytest.mark.parametrize("name", ["int4", "kivi-2:recent4:g8"])
def test_decoded_chunks_match_the_packed_blockwise_path(model, name):
    ids = _ids(80)
    packed = CompressedCache(model, _recipe(model, name))
    packed.packed.window_tokens = 16
    decoded = CompressedCache(model, _recipe(model, name), decoded_chunk_tokens=80)
    a = _logits(model, packed, ids, [50, 30])
    b = _logits(model, decoded, ids, [50, 30])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert packed.packed.blockwise_calls > 0 and decoded.packed.blockwise_calls == 0
    # decode steps still read the packed storage
    step = ids[:, -1:]
    with torch.no_grad():
        model(step, **cache_kwargs(decoded), use_cache=True)
    assert decoded.packed.calls > 0


def _kivi_reference(x: torch.Tensor, axis: str, group: int = 32, bits: int = 2) -> torch.Tensor:
    """KIVI's asymmetric min-max quantizer written out: keys per channel over groups of `group` tokens, values per
    token over groups of `group` channels; x [B, H, T, D] -> dequantized x."""
    b, h, t, d = x.shape
    g = x.reshape(b, h, t // group, group, d) if axis == "channel" else x.reshape(b, h, t, d // group, group)
    dim = 3 if axis == "channel" else 4
    lo, hi = g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return (((g - lo) / scale).round().clamp(0, 2 ** bits - 1) * scale + lo).reshape(b, h, t, d)


def test_kivi_cache_stores_what_kivi_quantization_gives():
    """Quantized keys and values of a kivi-2 cache equal the KIVI quantizer's (to the fp16 storage of its scales),
    and its recent window is the fp16 keys/values themselves. Layer 0 sees the fp16 inputs with prefill="exact"."""
    model = make_tiny_model("llama", vocab_size=128, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    ids = _ids(100)
    fp16 = DynamicCache(config=model.config)
    cache = CompressedCache(model, _recipe(model, "kivi-2"), residual_length=16, prefill="exact")
    _logits(model, fp16, ids, [100])
    _logits(model, cache, ids, [100])
    keys, values = fp16.layers[0].keys, fp16.layers[0].values
    k, v = cache.layers[0].k, cache.layers[0].v
    assert k.body.tokens == 64 and v.body.tokens == 84  # whole 32-token key groups; values token by token
    stored_k, stored_v = k.read(torch.float32), v.read(torch.float32)
    for got, ref in ((stored_k[..., :64, :], _kivi_reference(keys[..., :64, :], "channel")),
                     (stored_v[..., :84, :], _kivi_reference(values[..., :84, :], "token"))):
        step = (ref.amax() - ref.amin()) / 3
        assert ((got - ref).abs() > 0.01 * step).float().mean() < 0.01  # the same levels, bar rare fp16 rounding ties
    torch.testing.assert_close(stored_k[..., 64:, :], keys[..., 64:, :], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stored_v[..., 84:, :], values[..., 84:, :], rtol=1e-3, atol=1e-3)
