"""kvpack's fixed per-token vLLM slots against the codecs they pack (no vLLM needed)."""
from __future__ import annotations

import pytest
import torch

from kvpack.integrations.vllm import fastdecode
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, per_token_bytes, raw_part
from kvpack.recipes.bundled import SHIPPED_DIR
from kvpack.recipes.recipe import Recipe


@pytest.fixture(scope="module", params=["kvquant-3bit-1pct", "kvpack-3bit"])
def recipe(request) -> Recipe:
    return Recipe.load(SHIPPED_DIR / request.param)


def inside_range_keys(codec, tokens: int) -> torch.Tensor:
    """Keys [T, H, D] inside the codec's calibrated per-channel range (no outliers)."""
    u = torch.rand(tokens, codec.heads, codec.head_dim, generator=torch.Generator().manual_seed(0)) * 1.9 - 0.95
    return u * codec.scale.squeeze(1) + codec.zero.squeeze(1)


@pytest.mark.parametrize("layer", [0, 7])
def test_slots_decode_like_the_codec(recipe, layer):
    kc, vc = recipe.key_codecs[layer], recipe.value_codecs[layer]
    key, value = nuq_part(kc, None), nuq_part(vc, None)
    k = inside_range_keys(kc, 40)
    k[5, 1, :3] += 50 * kc.scale[1, 0, :3]  # 3 key outliers in one token: they fit its slots
    v = torch.randn(40, kc.heads, kc.head_dim, generator=torch.Generator().manual_seed(1))
    v[2, 0, 3] = 12.0
    k_rows, k_overflow = key.encode(k)
    v_rows, v_overflow = value.encode(v)
    assert k_rows.shape == (40, key.nbytes) and v_rows.shape == (40, value.nbytes)
    assert k_overflow == 0 and v_overflow == 0
    ref_k = kc.decode(kc.encode(k.transpose(0, 1))).transpose(0, 1)
    ref_v = vc.decode(vc.encode(v.transpose(0, 1))).transpose(0, 1)
    assert torch.equal(key.decode(k_rows), ref_k)
    assert torch.equal(value.decode(v_rows), ref_v)


def test_key_outliers_beyond_the_slots_are_clamped_and_counted(recipe):
    kc = recipe.key_codecs[3]
    key = nuq_part(kc, 2)
    k = inside_range_keys(kc, 4)
    k[1, 0, :4] += 100 * kc.scale[0, 0, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0])
    rows, overflow = key.encode(k)
    assert overflow == 2
    decoded = key.decode(rows)
    assert torch.allclose(decoded[1, 0, 2:4], k[1, 0, 2:4], rtol=1e-3)  # the two largest errors got the (fp16) slots
    assert (decoded[1, 0, :2] - k[1, 0, :2]).abs().min() > 10 * kc.scale[0, 0, :2].max()  # the others clamped


def test_compiled_decoder_matches_torch(recipe, monkeypatch):
    if not fastdecode.available():
        pytest.skip("numba not installed")
    value = nuq_part(recipe.value_codecs[4], None)
    rows, _ = value.encode(torch.randn(300, value.heads, value.head_dim))
    compiled = value.decode(rows)
    monkeypatch.setattr(fastdecode, "available", lambda: False)
    assert torch.equal(compiled, value.decode(rows))


def test_page_bytes_count_codes_ranges_outliers_and_sink(recipe):
    layers = [LayerSlots(nuq_part(k, None), nuq_part(v, None), 1, torch.bfloat16)
              for k, v in zip(recipe.key_codecs, recipe.value_codecs)]
    first = layers[0]
    n = first.key.channels
    code_bits = sum(int(p.widths.sum()) for p in (first.key, first.value))
    expected = (-(-int(first.key.widths.sum()) // 8) + -(-int(first.value.widths.sum()) // 8) + 4
                + 3 * (first.key.outlier_slots + first.value.outlier_slots))
    assert first.slot_bytes == expected and code_bits < 8 * first.slot_bytes
    assert first.sink_bytes == 2 * n * 2
    c = per_token_bytes(layers, 128, 2)
    total = sum(layer.block_bytes(128) for layer in layers)
    assert c % 2 == 0 and len(layers) * 128 * c >= total > len(layers) * 128 * (c - 2)
    assert 2 * n * 2 / c > 4.3  # ~4.5x smaller than bf16 slots


def test_raw_slots_are_the_model_dtype():
    part = raw_part(3, 64, torch.bfloat16)
    x = torch.randn(5, 3, 64).to(torch.bfloat16)
    rows, _ = part.encode(x)
    assert part.nbytes == 384 and torch.equal(part.decode(rows), x.float())


def test_page_pool_holds_every_key_outlier_through_chunked_writes():
    """Two requests written in prefill chunks and single tokens through vLLM-like slot mappings: with a pool of
    3 entries per token (2 used on average), keys read back exactly as NuqCodec stores them (sinks exact)."""
    from kvpack.integrations.vllm.config import KvpackVllmConfig
    from kvpack.integrations.vllm.layout import EngineLayout
    from kvpack.integrations.vllm.pages import PagePool
    from kvpack.integrations.vllm.read import gather_kv
    from kvpack.integrations.vllm.write import write_tokens

    recipe = Recipe.load(SHIPPED_DIR / "kvpack-3bit")
    n = 16
    layers = [LayerSlots(nuq_part(k, 0), nuq_part(v, None), 1, torch.float32, 3 * n)
              for k, v in zip(recipe.key_codecs, recipe.value_codecs)]
    layout = EngineLayout(KvpackVllmConfig(method="kvpack-3bit"), recipe, layers, torch.float32, None, n)
    c = layout.page_content_bytes()
    pool = PagePool(torch.zeros(30 * 20 * n * c, dtype=torch.uint8).view(30, 20, 1, n, c)[0], layers)
    kc, g = recipe.key_codecs[3], torch.Generator().manual_seed(0)

    def keys(t: int) -> torch.Tensor:
        k = inside_range_keys(kc, t)
        idx = torch.randint(0, t * 192, (t * 2,), generator=g)  # 2 outliers per token on average
        k.view(-1)[idx] += 30 * kc.scale.reshape(-1)[idx % 192]
        return k

    lens, table = [40, 23], torch.tensor([[3, 7, 1, 0], [5, 2, 0, 0]])
    ks, vs = [keys(t) for t in lens], [torch.randn(t, 3, 64, generator=g) for t in lens]
    clamped = 0
    for req, chunks in ((0, [(0, 25)] + [(p, p + 1) for p in range(25, 40)]), (1, [(0, 23)])):
        for a, b in chunks:
            pos = torch.arange(a, b)
            slots = table[req, pos // n] * n + pos % n
            clamped += write_tokens(layout, pool, 3, ks[req][a:b], vs[req][a:b], slots, pos)
    got, _ = gather_kv(layout, pool, 3, torch.tensor(lens), table)
    ref = torch.cat([kc.decode(kc.encode(k.transpose(0, 1))).transpose(0, 1) for k in ks])
    ref[0], ref[40] = ks[0][0], ks[1][0]
    assert clamped == 0
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-6)


def test_a_recent_window_is_refused_with_the_method_to_use():
    """Page slots hold every token packed: a windowed method names the method without its window."""
    import dataclasses

    from kvpack.integrations.vllm.config import KvpackVllmConfig, KvpackVllmError
    from kvpack.integrations.vllm.layout import layout_for
    from kvpack.methods import parse_method

    recipe = Recipe.load(SHIPPED_DIR / "kvpack-3bit")
    windowed = dataclasses.replace(recipe, settings=parse_method("kvpack-3bit:recent16"))
    with pytest.raises(KvpackVllmError, match="drop ':recent16'"):
        layout_for(KvpackVllmConfig(method="kvpack-3bit:recent16"), windowed, None, 3, 64, torch.bfloat16, 16, 2048)
