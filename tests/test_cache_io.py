"""Saving and loading a CompressedCache: exact round trip (generation continues identically) and a
clear CacheFileError for each failure: missing, damaged, truncated, not a kvpack cache, other
model, other weights, other recipe; writes are atomic."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import make_tiny_model

from kvpack.cache.cache import CompressedCache
from kvpack.errors import CacheFileError, KVPackError
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD = "int4:pre-rope:sink1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama, its recipe, a 20-token prompt cache saved to disk, and the next-token logits."""
    torch.set_num_threads(1)
    model = make_tiny_model("llama")
    recipe = Recipe.baseline(METHOD, 2)
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache(model, recipe)
    with torch.no_grad():
        model(ids[:, :20], **cache_kwargs(cache))
        model(ids[:, 20:22], **cache_kwargs(cache))  # a prefill block plus a run of later blocks
    path = tmp_path_factory.mktemp("cache") / "prompt.kvc"
    cache.save(path)
    with torch.no_grad():
        expected = model(ids[:, 22:], **cache_kwargs(cache)).logits
    return model, recipe, ids, path, expected


@torch.no_grad()
def test_round_trip_continues_identically(saved):
    model, recipe, ids, path, expected = saved
    loaded = CompressedCache.load(path, model, recipe)
    assert loaded.get_seq_length() == 22
    assert loaded.positions.tolist() == [list(range(22))]
    # same stored bytes; only the layout of the runs (one more run after loading) changes float summation order
    assert torch.allclose(model(ids[:, 22:], **cache_kwargs(loaded)).logits, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_round_trip_sliding_model_and_generate(tmp_path):
    model = make_tiny_model("gemma2", "eager")
    recipe = Recipe.baseline("int4:pre-rope", 2)
    ids = torch.randint(3, 120, (2, 30))
    cache = CompressedCache(model, recipe, block_tokens=4)
    model(ids, **cache_kwargs(cache))
    cache.save(tmp_path / "g.kvc")
    loaded = CompressedCache.load(tmp_path / "g.kvc", model, recipe)
    nxt = torch.randint(3, 120, (2, 1))
    assert torch.allclose(model(nxt, **cache_kwargs(loaded)).logits, model(nxt, **cache_kwargs(cache)).logits, atol=1e-6)


def test_no_temporary_file_is_left(saved):
    _, _, _, path, _ = saved
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_missing_file(saved, tmp_path):
    model, recipe, *_ = saved
    with pytest.raises(CacheFileError, match="No saved cache"):
        CompressedCache.load(tmp_path / "nope.kvc", model, recipe)


def test_damaged_tensor_bytes(saved, tmp_path):
    model, recipe, _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        CompressedCache.load(bad, model, recipe)


def test_truncated_file(saved, tmp_path):
    model, recipe, _, path, _ = saved
    bad = tmp_path / "short.kvc"
    bad.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CacheFileError, match="damaged"):
        CompressedCache.load(bad, model, recipe)


def test_garbled_header(saved, tmp_path):
    model, recipe, _, path, _ = saved
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["kvpack_cache"] = header["__metadata__"]["kvpack_cache"][:-7]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    bad = tmp_path / "hdr.kvc"
    bad.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    with pytest.raises(CacheFileError, match="header is damaged"):
        CompressedCache.load(bad, model, recipe)


def test_not_a_kvpack_cache(saved, tmp_path):
    from safetensors.torch import save_file

    model, recipe, *_ = saved
    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CacheFileError, match="not a kvpack cache"):
        CompressedCache.load(other, model, recipe)


def test_other_model_shape(saved):
    _, recipe, _, path, _ = saved
    other = make_tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(CacheFileError, match="different model.*num_key_value_heads"):
        CompressedCache.load(path, other, recipe)


def test_other_weights(saved):
    _, recipe, _, path, _ = saved
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(CacheFileError, match="model weights differ"):
        CompressedCache.load(path, other, recipe)


def test_other_recipe(saved):
    model, _, _, path, _ = saved
    with pytest.raises(CacheFileError, match="recipe 'int4:pre-rope:sink1'.*'nf4:pre-rope:sink1'"):
        CompressedCache.load(path, model, Recipe.baseline("nf4:pre-rope:sink1", 2))


def test_errors_are_kvpack_errors():
    assert issubclass(CacheFileError, KVPackError)


def test_failed_save_keeps_the_old_file(saved, tmp_path, monkeypatch):
    model, recipe, _, path, _ = saved
    target = tmp_path / "keep.kvc"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()
    cache = CompressedCache.load(target, model, recipe)
    import kvpack.cache.io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(kvpack.cache.io, "save_file", boom)
    with pytest.raises(OSError):
        cache.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.kvc"]
