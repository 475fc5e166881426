"""Memory held = memory reported: every tensor reachable from a CompressedCache, each storage once,
right after a prefill and after decode steps, equals `memory_report().total`; nothing is held twice."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from kvpack.cache.cache import CompressedCache
from kvpack.cache.memory import held_bytes, held_storages, storage_key
from kvpack.hf.attention import cache_kwargs
from kvpack.methods.names import parse_method
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(model, name: str) -> Recipe:
    from test_attention import nuq_recipe, rvq_recipe

    if name == "nuq":
        return nuq_recipe(model, 4, 0.05)
    if name == "rvq":
        return rvq_recipe(model)
    return Recipe.baseline(name, model.config.num_hidden_layers)


def _check(cache: CompressedCache, when: str) -> None:
    rep = cache.memory_report()
    held = held_bytes(cache)
    assert rep.total == sum(rep.parts.values())
    # memory_report counts everything held (within 1%), and nothing more
    assert abs(held - rep.total) <= 0.01 * held, f"{when}: held {held} B, reported {rep.total} B ({rep.parts})"
    # no second copy: the stored parts are exactly the run buffers, head and tail, each storage once
    stored = held_storages([layer.k for layer in cache.layers] + [layer.v for layer in cache.layers])
    buffers = {storage_key(b) for layer in cache.layers for s in (layer.k, layer.v) for r in s.body.runs
               for b in r.buffers.values()}
    buffers |= {storage_key(t) for layer in cache.layers for s in (layer.k, layer.v) for t in (s.head, s.tail)
                if t is not None}
    extra = set(stored) - buffers
    codec_held = held_storages(cache.recipe)
    assert not extra - set(codec_held), f"{when}: streams hold {len(extra)} storages besides their buffers"


@pytest.mark.parametrize("name", ["nuq", "rvq", "int4:pre-rope:sink1"])
@pytest.mark.parametrize("chunk", [40, 16])
@torch.no_grad()
def test_held_equals_reported_after_prefill_and_decode(name, chunk):
    model = make_tiny_model("llama")
    cache = CompressedCache(model, _recipe(model, name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 40), generator=g)
    for s in range(0, ids.shape[1], chunk):  # prefill in one forward (40) or in chunks (16, like chunked prefill)
        model(ids[:, s:s + chunk], **cache_kwargs(cache), use_cache=True)
    _check(cache, "after prefill")
    for _ in range(5):
        model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
    _check(cache, "after decode steps")
    assert cache.get_seq_length() == 45


@torch.no_grad()
def test_report_counts_rope_tables_and_capacity():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, _recipe(model, "nuq"))
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(1))
    model(ids, **cache_kwargs(cache), use_cache=True)
    for _ in range(3):
        model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
    rep = cache.memory_report()
    assert rep.parts["rope"] > 0  # packed attention's cos/sin table of every position
    assert rep.parts["reserved"] > 0  # capacity of the 1-token decode run and the position log
    assert rep.parts["codebooks"] == sum(c.shared_nbytes() for c in cache.recipe.key_codecs + cache.recipe.value_codecs)
    assert rep.parts["codebook_copies"] > 0  # e.g. the fp32 levels the codecs decode with
    assert rep.stored == rep.total - rep.parts["codebook_copies"] - rep.parts["rope"] - rep.parts["reserved"]


def test_store_keeps_no_second_reference_to_the_newest_block():
    from kvpack.cache.store import BlockStore
    from kvpack.codecs import Encoded, Fp16Codec

    codec = Fp16Codec()
    store = BlockStore()
    enc = codec.encode(torch.randn(1, 2, 8, 16))
    ptr = enc.tensors[next(iter(enc.tensors))].data_ptr()
    store.append(enc, codec)
    del enc
    found = held_storages(store)
    assert len(found) == len(store.runs[0].buffers)  # the run's buffers, nothing else
    assert store.runs[0].buffers[next(iter(store.runs[0].buffers))].data_ptr() == ptr  # taken over, not copied
    store.append(codec.encode(torch.randn(1, 2, 8, 16)), codec)
    assert isinstance(store.runs[-1].block(store.runs[-1].count - 1), Encoded)
    assert len(held_storages(store)) == len(store.runs[-1].buffers) * len(store.runs)
