"""`kvpack bench` end to end on a tiny random model: rows, ratios against fp16 from the same run, plot."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.evaluate import speed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (600,), generator=g)))
    return path


def test_bench_rows_and_plot(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    rows = speed.run_bench("tiny-llama", "cpu", [48, 160], 2, ["kvquant-4bit-1pct", "kivi-2:g8"], rounds=2,
                           source_tokens=32, data=str(text_file), calib_data=str(text_file), calib_windows=2,
                           calib_seqlen=64, model=model, tokenizer=tok, progress=False, log=lambda s: None)
    assert [(r["method"], r["context"]) for r in rows] == [
        (m, c) for c in (48, 160) for m in ("fp16", "kvquant-4bit-1pct", "kivi-2:g8")]
    for row in rows:
        for key in ("method", "device", "context", "batch", "attention_ms", "step_ms", "peak_bytes", "attention_ratio",
                    "step_ratio", "cache_bytes", "prefill_tokens_per_s"):
            assert row[key] is not None, key
        assert row["batch"] == 2 and row["attention_ms"] > 0 and row["step_ms"] > 0 and row["peak_bytes"] > 0
    fp16 = [r for r in rows if r["method"] == "fp16"]
    assert all(r["attention_ratio"] == 1.0 and r["memory_ratio"] == 1.0 for r in fp16)
    kvq = [r for r in rows if r["method"] == "kvquant-4bit-1pct"]
    assert all(r["memory_ratio"] > 2 and r["attention_kernel"] in ("cpu", "torch") for r in kvq)
    assert "repeated" in rows[0]["kv_source"]
    png = speed.plot(rows, tmp_path / "bench.png")
    assert png.stat().st_size > 1000
    (tmp_path / "rows.json").write_text(json.dumps(rows))


def test_filled_cache_holds_what_encoding_stores():
    """fill_compressed's copies of an encoded source chunk == encoding every repeated chunk."""
    from test_attention import nuq_recipe

    model = make_tiny_model("llama")
    recipe = nuq_recipe(model, 3, 0.02)
    kv, _ = speed.capture_kv(model, None, "no-such-corpus", 16)
    fast, _, timed = speed.fill_compressed(model, recipe, kv, 80, 1, encode_tokens=16)
    slow, _, _ = speed.fill_compressed(model, recipe, kv, 80, 1, encode_tokens=80)
    assert timed == 16
    for a, b in zip(fast.layers, slow.layers):
        assert torch.equal(a.k.read(torch.float32), b.k.read(torch.float32))
        assert torch.equal(a.v.read(torch.float32), b.v.read(torch.float32))
