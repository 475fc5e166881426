"""Memory held = memory reported: every tensor reachable from a CompressedCache, each storage once,
right after a prefill and after decode steps, equals what `memory_report()` counts (the cache's tensors
plus the per-model state of its recipe); nothing is held twice; bookkeeping does not grow per token."""
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
    assert rep.total == sum(rep.parts.values()) and rep.model_total == sum(rep.model_parts.values())
    # memory_report counts every tensor held (within 1%), and nothing more; Python objects on top
    tensors = rep.tensor_bytes
    assert abs(held - tensors) <= 0.01 * held, f"{when}: held {held} B, reported {tensors} B ({rep.parts})"
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
    codecs = {id(c): c for c in cache.recipe.key_codecs + cache.recipe.value_codecs}.values()
    assert rep.model_parts["codebooks"] == rep.fixed_bytes == sum(c.shared_nbytes() for c in codecs)
    assert rep.model_parts["codebook_tables"] == 0  # the C++ kernels read the codecs' fp16 state as held: no copies
    derived = rep.parts["rope"] + rep.parts["unlisted"] + rep.parts["bookkeeping"] + rep.parts["reserved"]
    assert rep.stored == rep.total - derived + rep.fixed_bytes


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


def _longest_container(obj, stop: tuple) -> int:
    """Length of the longest list, tuple, dict or set reachable from `obj` (not entering `stop` or modules)."""
    from torch import nn

    seen, todo, longest = {id(o) for o in stop}, [obj], 0
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen or isinstance(o, (torch.Tensor, nn.Module, str, bytes, int, float, type)):
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            longest = max(longest, len(o))
            todo += list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            longest = max(longest, len(o))
            todo += list(o)
        elif hasattr(o, "__dict__"):
            todo += list(vars(o).values())
    return longest


@torch.no_grad()
def test_bookkeeping_does_not_grow_per_token():
    """300 one-token decode steps: no Python container grows with the tokens, the bookkeeping the report counts
    stays flat, and what the report counts grows with the packed bytes (reserved capacity and RoPE tables aside)."""
    model = make_tiny_model("llama")
    cache = CompressedCache(model, _recipe(model, "nuq"))
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(2))
    model(ids, **cache_kwargs(cache), use_cache=True)
    stop = (cache.model_ref, cache.log.source, cache.recipe)
    reports = {}
    for step in range(1, 301):
        model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
        if step in (20, 300):
            reports[step] = cache.memory_report()
            assert _longest_container(cache, stop) < 64, f"a container grows with the tokens (step {step})"
    early, late = reports[20], reports[300]
    assert late.tokens - early.tokens == 280
    assert late.parts["bookkeeping"] - early.parts["bookkeeping"] < 2048, (early.parts, late.parts)
    assert late.model_total == early.model_total  # per-model state is built once, not per token
    packed = ("codes", "scales", "outliers", "positions")
    grew = sum(late.parts[p] - early.parts[p] for p in packed)
    grew_all = (late.total - late.parts["rope"]) - (early.total - early.parts["rope"])
    assert grew > 0 and grew_all <= 1.2 * grew, (early.parts, late.parts)
    _check(cache, "after 300 decode steps")
