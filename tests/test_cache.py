"""CompressedCache on tiny random models: equality with simulation, exact pre-RoPE storage,
left padding, generate() on several architectures, sliding windows, crop, beam search, memory."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from kvpack.cache.cache import CompressedCache
from kvpack.codecs import Fp16Codec
from kvpack.errors import MethodError, UnsupportedArchitectureError
from kvpack.hf.attention import cache_kwargs, intercept_kv
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.simulate import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(method: str, layers: int = 2) -> Recipe:
    return Recipe.baseline(method, layers)


def stream_logits(model, ids, cache, chunk):
    outs = [model(ids[:, s:s + chunk], **cache_kwargs(cache), use_cache=True).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("method", ["int4:pre-rope:sink1", "nf3:pre-rope:key-channel:g8:sink2", "int2", "fp16:pre-rope"])
@pytest.mark.parametrize("chunk", [1, 5])
@torch.no_grad()
def test_cache_matches_simulation(method, chunk):
    """Per-token codecs without a recent window: the real cache gives the simulated logits (float noise);
    grouped keys differ only while a token group is still open (fp16 in the cache)."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 33), generator=torch.Generator().manual_seed(0))
    r = recipe(method)
    with intercept_kv(model, Simulator(r)):
        sim = model(ids).logits
    real = stream_logits(model, ids, CompressedCache(model, r), chunk)
    if "g8" in method:  # the cache keeps each open key group in fp16: only the sink positions agree exactly
        assert torch.allclose(real[:, :2], sim[:, :2], atol=1e-4)
        assert (real - sim).abs().max() < 0.5
    else:
        assert torch.allclose(real, sim, atol=1e-4), float((real - sim).abs().max())


@torch.no_grad()
def test_prefill_in_one_chunk_is_the_simulation():
    model = make_tiny_model("qwen2")
    ids = torch.randint(3, 120, (1, 40))
    r = recipe("int3:key-channel:g8:recent6:sink1")
    with intercept_kv(model, Simulator(r, served_window=False)):  # one chunk stores the window-end split
        sim = model(ids).logits
    assert torch.allclose(model(ids, **cache_kwargs(CompressedCache(model, r))).logits, sim, atol=1e-5)


@torch.no_grad()
def test_pre_rope_storage_is_exact():
    """With an fp16 codec the stored keys are the k_proj outputs (before RoPE), to fp16 rounding."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 12))
    captured = {}
    attn = model.model.layers[1].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    cache = CompressedCache(model, recipe("fp16:pre-rope"))
    model(ids, **cache_kwargs(cache))
    hook.remove()
    k_proj = captured["k"].view(1, 12, 2, 16).transpose(1, 2)
    stored = cache.layers[1].k.read(torch.float32)
    assert torch.allclose(stored, k_proj.half().float(), atol=2e-3, rtol=1e-3)
    assert (stored - k_proj).abs().max() <= k_proj.abs().max() * 2**-10


@torch.no_grad()
def test_positions_and_rope_reapplied_at_stored_positions():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 10))
    cache = CompressedCache(model, recipe("fp16:pre-rope"))
    model(ids[:, :6], **cache_kwargs(cache))
    model(ids[:, 6:], **cache_kwargs(cache))
    assert cache.positions.tolist() == [list(range(10))]
    ref = model(ids).logits[:, -1]
    cache2 = CompressedCache(model, recipe("fp16:pre-rope"))
    model(ids[:, :9], **cache_kwargs(cache2))
    out = model(ids[:, 9:], **cache_kwargs(cache2)).logits[:, -1]
    assert torch.allclose(out, ref, atol=1e-2)


@pytest.mark.parametrize("method", ["int4:pre-rope", "fp16:pre-rope:sink1"])
@torch.no_grad()
def test_left_padded_batch_rows_match_single_rows(method):
    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 120, (1, 20), generator=g), torch.randint(3, 120, (1, 14), generator=g)
    pad = torch.full((1, 6), 2)
    ids = torch.cat([long, torch.cat([pad, short], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 6), torch.ones(1, 14)], 1)]).long()
    r = recipe(method)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(CompressedCache(model, r)), max_new_tokens=6,
                         do_sample=False, pad_token_id=2)
    for row, single in ((0, long), (1, short)):
        alone = model.generate(single, **cache_kwargs(CompressedCache(model, r)), max_new_tokens=6, do_sample=False,
                               pad_token_id=2)
        assert out[row, -6:].tolist() == alone[0, -6:].tolist()


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa"),
                                       ("gemma2", "eager"), ("gemma3", "sdpa")])
@torch.no_grad()
def test_generate_on_tiny_architectures(arch, attn):
    model = make_tiny_model(arch, attn)
    ids = torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    fp = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
    exact = model.generate(ids, **cache_kwargs(CompressedCache(model, recipe("fp16:pre-rope:sink1"))), max_new_tokens=12,
                           do_sample=False, pad_token_id=2)
    assert exact.tolist() == fp.tolist()  # fp16 storage of a float32 model keeps greedy tokens here
    cache = CompressedCache(model, recipe("int4:pre-rope:sink1"))
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert out.shape == fp.shape and cache.get_seq_length() == 24 + 11
    assert cache.memory_report().storage_ratio > 1.5  # 16-dim heads: two fp16 stats per 16 4-bit codes


@torch.no_grad()
def test_sliding_layers_free_what_leaves_the_window():
    """Gemma2-style: window 16; sliding layers keep at most window-1 + one block of tokens; logits match
    a DynamicCache run (fp16 codec)."""
    model = make_tiny_model("gemma2", "eager")
    ids = torch.randint(3, 120, (1, 60))
    cache = CompressedCache(model, recipe("fp16:pre-rope"), block_tokens=4)
    real = stream_logits(model, ids, cache, 1)
    ref = model(ids).logits
    assert torch.allclose(real, ref, atol=2e-2), float((real - ref).abs().max())
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.is_sliding and not full.is_sliding
    assert full.k.stored == 60
    assert 15 <= sliding.k.stored <= 15 + 4 and sliding.k.dropped == 60 - sliding.k.stored


@torch.no_grad()
def test_kivi_groups_and_recent_window_layout():
    model = make_tiny_model("llama", head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    ids = torch.randint(3, 120, (1, 100))
    cache = CompressedCache(model, recipe("kivi-2"), residual_length=16)
    stream_logits(model, ids, cache, 7)
    k, v = cache.layers[0].k, cache.layers[0].v
    assert k.stored == v.stored == 100
    assert k.body.tokens % 32 == 0 and 16 <= k.tail_len < 16 + 32  # whole key groups of 32 only
    assert v.tail_len == 16 and v.body.tokens == 84


@torch.no_grad()
def test_appends_never_reencode_and_runs_stack():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 30))
    cache = CompressedCache(model, recipe("int4:pre-rope"))
    model(ids[:, :20], **cache_kwargs(cache))
    first = {n: b[: 1].clone() for n, b in cache.layers[0].k.body.runs[0].buffers.items()}
    for t in range(20, 30):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    runs = cache.layers[0].k.body.runs
    assert [r.count for r in runs] == [1, 10]  # the prefill block, then ten 1-token blocks in one run
    for n, b in runs[0].buffers.items():
        assert torch.equal(b[:1], first[n])


@torch.no_grad()
def test_crop_and_beam_search():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 16))
    cache = CompressedCache(model, recipe("int4:pre-rope"))
    stream_logits(model, ids, cache, 1)
    cache.crop(-3)
    assert cache.get_seq_length() == 13 and cache.positions.shape[1] == 13
    ref_cache = CompressedCache(model, recipe("int4:pre-rope"))
    stream_logits(model, ids[:, :13], ref_cache, 1)
    a = model(ids[:, 13:], **cache_kwargs(cache)).logits
    b = model(ids[:, 13:], **cache_kwargs(ref_cache)).logits
    assert torch.allclose(a, b, atol=1e-5)
    prefill = CompressedCache(model, recipe("int4:pre-rope"))
    model(ids, **cache_kwargs(prefill))
    prefill.crop(-3)  # inside the prefill block: its first tokens are kept exactly as encoding them alone stores them
    c = model(ids[:, 13:], **cache_kwargs(prefill)).logits
    assert torch.allclose(c, b, atol=1e-5)
    beams = model.generate(ids, **cache_kwargs(CompressedCache(model, recipe("int4:pre-rope"))), num_beams=3,
                           max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert beams.shape == (1, 21)


def test_unstreamable_codec_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(MethodError, match="token groups"):
        CompressedCache(model, recipe("int4:key-channel"))


def test_pre_rope_cache_needs_the_model_forward():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, recipe("int4:pre-rope"))
    with pytest.raises(UnsupportedArchitectureError, match="no rotary cos/sin"):
        cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)


@torch.no_grad()
def test_memory_report_counts_parts():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 64))
    cache = CompressedCache(model, recipe("int4:pre-rope:sink1"))
    model(ids, **cache_kwargs(cache))
    rep = cache.memory_report()
    # 2 layers x K,V x 2 heads x 16 dims: codes 63 tokens x 4 bits, min+step fp16 per token, 1 fp16 sink token
    elems_per_token = 2 * 2 * 2 * 16
    assert rep.parts["codes"] == 63 * elems_per_token // 2
    assert rep.parts["scales"] == 63 * 2 * 2 * 2 * 2 * 2
    assert rep.parts["sink_window"] == 1 * elems_per_token * 2
    assert rep.parts["positions"] == 64 * 4
    assert rep.fp16_total == 64 * elems_per_token * 2
    assert rep.total == sum(rep.parts.values())
    assert abs(rep.per_token_per_layer["total"] * 64 * 2 - rep.total) < 1e-6
    assert "B/token/layer" in str(rep)


def test_fp16_codec_recipe_roundtrip_is_exact_in_fp16():
    x = torch.randn(1, 2, 5, 16)
    assert torch.equal(Fp16Codec().decode(Fp16Codec().encode(x)), x.half().float())
