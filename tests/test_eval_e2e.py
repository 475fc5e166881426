"""End to end on the embedded SmolLM2: `kvpack eval` on 2 short windows, then `kvpack report`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import single_thread
from kvpack.cli.app import app
from kvpack.data import load_windows
from kvpack.evaluate.perplexity import window_nll

pytestmark = pytest.mark.usefixtures("one_thread", "shared_corpora")

REQUIRED = {"method", "bits_per_element", "ppl", "model", "data", "seqlen", "windows"}
SEQLEN, WINDOWS = 128, 2


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "e2e.json"
    with single_thread():
        result = CliRunner().invoke(app, [
            "eval", "--model", "smollm2-135m", "--data", "wikitext2", "--methods", "fp16,int4,kivi-2",
            "--seqlen", str(SEQLEN), "--max-windows", str(WINDOWS), "--json", str(out), "--no-progress",
        ])
    return result, out


def test_eval_writes_rows(eval_run):
    result, out = eval_run
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["fp16", "int4", "kivi-2"]  # fp16 always measured, first
    for row in rows:
        assert REQUIRED <= row.keys()
        assert (row["model"], row["data"], row["seqlen"], row["windows"]) == ("smollm2-135m", "wikitext2", SEQLEN, WINDOWS)
        assert row["tokens"] == WINDOWS * (SEQLEN - 1)
        assert math.isfinite(row["ppl"]) and row["nll"] == pytest.approx(math.log(row["ppl"]))
    fp16, int4, kivi = rows
    assert 3 < fp16["ppl"] < 300  # a working small LM on English text
    assert fp16["bits_per_element"] == 16.0
    assert int4["ppl"] > fp16["ppl"] * 0.99
    assert int4["ppl"] < fp16["ppl"] * 3  # int4 per token hurts, but does not break the model
    assert int4["bits_per_element"] == pytest.approx(4 + 32 / 64)  # head_dim 64: fp16 min + step per token
    # KIVI keeps the last 128 tokens in fp16: at 128 tokens everything is fp16, the same computation
    assert kivi["bits_per_element"] == 16.0
    assert kivi["ppl"] == pytest.approx(fp16["ppl"], rel=1e-9)
    assert fp16["delta"] == 0.0 and fp16["delta_pct"] == 0.0
    assert int4["delta"] == pytest.approx(int4["ppl"] - fp16["ppl"])
    assert int4["delta_pct"] == pytest.approx(100 * (int4["ppl"] / fp16["ppl"] - 1))


def test_eval_prints_table(eval_run):
    result, _ = eval_run
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "bits/elem", "ppl", "delta", "delta", "%"]
    assert any(line.split()[:2] == ["int4", "4.500"] for line in lines)
    assert any(line.split()[:2] == ["fp16", "16.000"] for line in lines)


def test_fp16_row_matches_the_plain_model(eval_run, smollm2):
    """Simulated fp16 K/V is (nearly) the model itself: same windows, same protocol."""
    model, tokenizer = smollm2
    rows = json.loads(eval_run[1].read_text())
    windows = load_windows(tokenizer, "wikitext2", SEQLEN, WINDOWS)
    with torch.no_grad():
        nll = sum(window_nll(model, w[None])[0] for w in windows)
    plain = math.exp(nll / (WINDOWS * (SEQLEN - 1)))
    assert rows[0]["ppl"] == pytest.approx(plain, rel=5e-3)


def test_report_renders_readme_block(eval_run, tmp_path):
    _, out = eval_run
    results = tmp_path / "results"
    results.mkdir()
    (results / "smoke.json").write_text(out.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- results:smoke -->\nstale table\n<!-- /results -->\n\n"
                      "<!-- results:later -->\n<!-- /results -->\nend\n")
    runner = CliRunner()
    assert runner.invoke(app, ["report", "--results", str(results), "--readme", str(readme), "--check"]).exit_code == 1
    done = runner.invoke(app, ["report", "--results", str(results), "--readme", str(readme)])
    assert done.exit_code == 0, done.output
    text = readme.read_text()
    assert "stale table" not in text
    assert "| method | bits/elem | ppl | delta | delta % |" in text
    assert "| fp16 | 16.000 |" in text and "| int4 | 4.500 |" in text
    assert f"model `smollm2-135m`, data `wikitext2`, seqlen {SEQLEN}, {WINDOWS} windows" in text
    assert "*(not measured yet:" in text and "later.json is missing" in text
    assert text.startswith("# Title\n") and text.endswith("<!-- /results -->\nend\n")
    again = runner.invoke(app, ["report", "--results", str(results), "--readme", str(readme), "--check"])
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "int9"], "bit width must be in 2..8"),
        (["--methods", "int4:bogus"], "Unknown method option 'bogus'"),
        (["--key-axis", "head"], "--key-axis must be 'token' or 'channel'"),
    ],
)
def test_eval_errors_are_clean(args, message):
    result = CliRunner().invoke(app, ["eval", "--no-progress", *args])
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_eval_missing_data_is_clean(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--no-progress", "--data", str(tmp_path / "none.txt"), "--seqlen", "16"])
    assert result.exit_code == 2
    assert "neither a named set" in result.output


def test_run_eval_adds_fp16_and_applies_flags(tmp_path):
    """run_eval on a tiny local model: fp16 is measured first even when not asked for, CLI flags
    reach every method and show in its name."""
    from conftest import make_tiny_model, make_tiny_tokenizer
    from kvpack.evaluate.run import run_eval

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(200)))
    rows = run_eval(str(model_dir), str(text), ["int4", "nf3:g8"], seqlen=32, max_windows=3, pre_rope=True, progress=False)
    assert [r["method"] for r in rows] == ["fp16", "int4:pre-rope", "nf3:pre-rope:g8"]
    assert all(r["windows"] == 3 and r["tokens"] == 3 * 31 for r in rows)
    assert rows[1]["bits_per_element"] == pytest.approx(4 + 32 / 16)
    assert rows[2]["bits_per_element"] == pytest.approx(3 + 32 / 8)
    assert rows[0]["delta"] == 0.0 and rows[1]["ppl"] != rows[0]["ppl"]
