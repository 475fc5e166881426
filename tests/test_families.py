"""Every registered method family through one matrix on a tiny Llama: parse -> fit -> simulate -> real cache
-> save/load -> attention over packed storage (a kernel, or the declared torch reference).

A newly registered family is checked here the moment it is registered: it runs with the name in
FAMILY_CASES or, failing that, its first preset.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import kvpack
from kvpack.cache import CompressedCache
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.hf.attention import cache_kwargs
from kvpack.kernels import dispatch
from kvpack.methods import families, needs_calibration, parse_method
from kvpack.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

# Names small enough for a 2-layer model with head_dim 16 and a few hundred calibration tokens.
FAMILY_CASES = {
    "baseline": ["int4:pre-rope:key-channel:g8", "kivi-2:recent8:g8"],
    # the kvpack-3bit switches named explicitly: per-channel widths through cache and kernels, whatever the
    # held-out check of `kvpack-3bit` keeps on the tiny model
    "kvquant": ["kvquant-3bit-1pct", "kvquant-3bit-1pct:fisher-s2:alloc-global:qnorm:budget48"],
    "rvq": ["rvq-d2-c16-g8:1pct"],
    "kvpack": ["kvpack-3bit:budget48"],  # per-channel codebooks paid from 48 tokens of codes (the test's length)
}


def _cases() -> list[str]:
    names = []
    for family in families():
        names += FAMILY_CASES.get(family.name) or [family.presets[0]]
    return names


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (800,), generator=g)))
    return path


def _recipe(model, tokenizer, name: str, text_file) -> Recipe:
    settings = parse_method(name)
    assert parse_method(settings.name) == settings  # canonical names re-parse to the same settings
    if not needs_calibration(settings):
        return Recipe.baseline(settings, model.config.num_hidden_layers)
    return kvpack.calibrate(model, tokenizer, settings, data=str(text_file), windows=3, seqlen=64, progress=False)


@pytest.mark.parametrize("name", _cases())
@torch.no_grad()
def test_family_matrix(name, text_file, tmp_path):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    recipe = _recipe(model, tokenizer, name, text_file)
    assert recipe.num_layers == model.config.num_hidden_layers

    ids = torch.randint(3, 120, (1, 48), generator=torch.Generator().manual_seed(1))
    sim = simulated_perplexity(model, ids, recipe, progress=False)
    assert math.isfinite(sim.ppl) and 0 < sim.bits_per_element < 16

    # the real cache: a prefill, then decode steps through packed attention, next to decode-then-attend
    logits = {}
    for packed in (False, True):
        cache = CompressedCache(model, recipe, packed_attention=packed, block_tokens=8)
        out = [model(ids[:, :32], **cache_kwargs(cache)).logits[:, -1]]
        for t in range(32, 40):
            out.append(model(ids[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1])
        logits[packed] = torch.stack(out)
    torch.testing.assert_close(logits[True], logits[False], atol=2e-4, rtol=1e-4)
    assert cache.packed.calls > 0

    # attention over the stored parts: the auto backend (a kernel where one covers the codec) equals the
    # torch reference, and every run says which path it took
    layer = cache.layers[0]
    query = torch.randn(1, model.config.num_attention_heads, 1, layer.k.head.shape[-1] if layer.k.head is not None
                        else model.config.hidden_size // model.config.num_attention_heads)
    rope = cache.packed.rope
    paths_ref, paths = [], []
    ref = dispatch.layer_attention(layer, query, backend="torch", rope=rope, paths=paths_ref)
    got = dispatch.layer_attention(layer, query, backend="auto", rope=rope, paths=paths)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert paths and all(p in ("torch", "cpu", "cpu-nuq", "cpu-rvq", "triton") for _, p in paths)

    # save/load: the recipe and the cache round-trip, and generation continues identically
    recipe.save(tmp_path / "recipe")
    loaded = Recipe.load(tmp_path / "recipe", model)
    assert loaded.settings == recipe.settings
    cache.save(tmp_path / "cache.kvc")
    again = CompressedCache.load(tmp_path / "cache.kvc", model, loaded)
    nxt = ids[:, 40:41]
    torch.testing.assert_close(model(nxt, **cache_kwargs(again)).logits, model(nxt, **cache_kwargs(cache)).logits)
