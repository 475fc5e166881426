"""kvpack plan: shapes, measured bits per element, the longest context / largest batch that fit."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvpack.evaluate import plan as kplan
from kvpack.cli.app import app


def test_parse_memory():
    assert kplan.parse_memory("80GiB") == 80 * 2**30
    assert kplan.parse_memory("24 GB") == 24 * 10**9
    assert kplan.parse_memory("1.5MiB") == int(1.5 * 2**20)
    with pytest.raises(Exception, match="cannot read"):
        kplan.parse_memory("eighty")


@pytest.mark.parametrize("name,billions", [("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-3-8b", 8.03),
                                           ("mistral-7b", 7.25), ("qwen2-7b", 7.62), ("smollm2-135m", 0.1345)])
def test_bundled_shapes_match_public_parameter_counts(name, billions):
    assert kplan.load_shape(name).parameters() / 1e9 == pytest.approx(billions, rel=2e-3)


def test_config_file(tmp_path):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=100, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = kplan.load_shape(str(tmp_path))
    assert shape.head_dim == 16 and shape.num_key_value_heads == 2


def test_measured_bits():
    fp16 = kplan.measure_storage("fp16", 2, 16)
    assert fp16.bits_per_element == 16.0 and fp16.body_bytes_per_token == 2 * 2 * 2 * 16
    int4 = kplan.measure_storage("int4", 2, 16, tokens=64)
    assert int4.bits_per_element == pytest.approx(4 + 32 / 16)  # fp16 min and step per token and head
    kvq = kplan.measure_storage("kvquant-3bit-1pct", 4, 32, tokens=256)
    assert 3.0 < kvq.bits_per_element < 3.6 and kvq.fixed_tokens == 1 and kvq.positions and kvq.shared_bytes > 0


def test_plan_limits_are_tight():
    shape = kplan.load_shape("smollm2-135m")
    memory = kplan.parse_memory("1GiB")
    rows = kplan.plan(shape, memory, ["kvquant-4bit-1pct", "kivi-2"], batch=2, context=4096)
    assert [r.method for r in rows] == ["fp16", "kvquant-4bit-1pct", "kivi-2"]
    for r in rows:
        storage = kplan.measure_storage(r.method, shape.num_key_value_heads, shape.head_dim)
        assert kplan.total_bytes(shape, storage, r.max_context, 2) <= memory < kplan.total_bytes(shape, storage, r.max_context + 1, 2)
        assert kplan.total_bytes(shape, storage, 4096, r.max_batch) <= memory < kplan.total_bytes(shape, storage, 4096, r.max_batch + 1)
    assert rows[1].max_context > 3 * rows[0].max_context and rows[1].ratio_vs_fp16_context > 3


def test_cli_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "smollm2-135m", "--memory", "2GiB", "--method",
                                      "kvquant-2bit-1pct", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "max context" in result.output
    rows = json.loads(out.read_text())
    assert rows[0]["method"] == "fp16" and rows[1]["max_context"] > rows[0]["max_context"]
