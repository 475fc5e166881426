"""`kvpack bench` end to end on a tiny random model: baselines by storage dtype, ratios against the fastest
baseline of the same run, caches built through the generation path, memory held = memory reported, plot."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.errors import MethodError
from kvpack.evaluate import speed
from kvpack.evaluate.bench.baselines import split_methods
from kvpack.hf.attention import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (600,), generator=g)))
    return path


def test_bench_rows_and_plot(tmp_path, text_file, monkeypatch):
    from kvpack.hf.models import cache_root

    kernels = cache_root() / "kernels"  # reuse the compiled CPU kernels; recipes go to a fresh cache
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(kernels)
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    rows = speed.run_bench("tiny-llama", "cpu", [48, 160], [1, 2], ["kvquant-4bit-1pct", "kivi-2:g8"], rounds=2,
                           data=str(text_file), calib_data=str(text_file), calib_windows=2, calib_seqlen=64,
                           model=model, tokenizer=tok, progress=False, log=lambda s: None, prefill_chunk=32,
                           model_prefill_tokens=64, decode_warmup=2)
    methods = ("dynamic-fp32", "dynamic-bf16", "kvquant-4bit-1pct", "kivi-2:g8")
    assert [(r["method"], r["context"], r["batch"]) for r in rows] == [
        (m, c, b) for c in (48, 160) for b in (1, 2) for m in methods]
    for row in rows:
        for key in ("storage_dtype", "attention_ms", "step_ms", "attention_ratio", "step_ratio", "cache_bytes",
                    "held_bytes", "memory_ratio", "attention_baseline", "step_baseline"):
            assert row[key] is not None, key
        assert row["attention_ms"] > 0 and row["step_ms"] > 0
        assert row["attention_baseline"] in ("dynamic-fp32", "dynamic-bf16")
        group = [r for r in rows if r["context"] == row["context"] and r["batch"] == row["batch"] and r["baseline"]]
        fastest = min(r["attention_ms"] for r in group)
        assert row["attention_ratio"] == pytest.approx(row["attention_ms"] / fastest)
    by = {(r["method"], r["context"], r["batch"]): r for r in rows}
    assert by["dynamic-fp32", 48, 1]["storage_dtype"] == "float32"
    assert by["dynamic-bf16", 48, 1]["storage_dtype"] == "bfloat16"
    assert by["dynamic-bf16", 48, 1]["model_dtype"] == "bfloat16"
    # memory against 16-bit storage: the bf16 DynamicCache is 1.0, fp32 0.5
    assert by["dynamic-bf16", 160, 2]["memory_ratio"] == pytest.approx(1.0, rel=0.01)
    assert by["dynamic-fp32", 160, 2]["memory_ratio"] == pytest.approx(0.5, rel=0.01)
    for r in rows:
        if not r["baseline"]:
            assert r["held_bytes"] == pytest.approx(r["report_bytes"], rel=0.01)
            assert r["attention_kernel"]
    # tokens 64..160 repeat the prompt's K/V through the cache's update(), and the rows say so
    assert "without a model forward" in by["kvquant-4bit-1pct", 160, 1]["fill"]
    assert "without a model forward" not in by["kvquant-4bit-1pct", 48, 1]["fill"]
    png = speed.plot(rows, tmp_path / "bench.png")
    assert png.stat().st_size > 1000
    (tmp_path / "rows.json").write_text(json.dumps(rows))


def test_baseline_names_do_not_collide_with_kvpack_methods():
    assert split_methods(["fp16", "kvquant-4bit-1pct"]) == (["dynamic-fp32", "dynamic-bf16"], ["fp16", "kvquant-4bit-1pct"])
    assert split_methods(["dynamic-fp16"])[0] == ["dynamic-fp32", "dynamic-bf16", "dynamic-fp16"]
    with pytest.raises(MethodError, match="dynamic-bf16"):
        split_methods(["bf16"])


@torch.no_grad()
def test_tee_builds_what_chunked_generation_builds():
    """A cache fed by TeeCache during a chunked prefill holds the same blocks as one the model prefills itself."""
    from test_attention import nuq_recipe

    from kvpack.cache.cache import CompressedCache
    from kvpack.evaluate.bench.fill import TeeCache, Target, prefill

    model = make_tiny_model("llama")
    recipe = nuq_recipe(model, 4, 0.05)
    ids = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(0))
    direct = CompressedCache(model, recipe)
    for s in range(0, 96, 32):
        model(ids[:, s:s + 32], **cache_kwargs(direct), use_cache=True)
    teed = CompressedCache(model, recipe)
    tee = TeeCache(model.config, [Target("nuq", 1, 96, teed, model, torch.float16, True)])
    prefill(model, ids, tee, 0, 96, 32)
    for a, b in zip(direct.layers, teed.layers):
        for x, y in ((a.k, b.k), (a.v, b.v)):  # same blocks, runs and fp16 head/tail
            assert [(r.block_shape, r.count) for r in x.body.runs] == [(r.block_shape, r.count) for r in y.body.runs]
            assert x.head_len == y.head_len and x.tail_len == y.tail_len
    assert torch.equal(direct.positions, teed.positions)
    # the first chunk's K/V do not depend on the history: identical bytes (later chunks differ: while teeing the
    # model attends over the uncompressed history)
    first = direct.layers[0].k.body.runs[0]
    assert torch.equal(first.tensor("codes"), teed.layers[0].k.body.runs[0].tensor("codes"))
