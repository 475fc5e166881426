"""README rendering from JSON results: row/column selection in the results markers."""
import json

import pytest

from kvpack.evaluate.report import render_readme, select_rows


def _write(tmp_path, rows):
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "t.json").write_text(json.dumps(rows))


ROWS = [
    {"method": "fp16", "bits_per_element": 16.0, "ppl": 10.0, "model": "m", "data": "d", "seqlen": 8, "windows": 2},
    {"method": "kvquant-3bit", "bits_per_element": 3.1, "ppl": 11.0, "model": "m", "data": "d", "seqlen": 8, "windows": 2},
    {"method": "kvquant-3bit:plain", "bits_per_element": 3.1, "ppl": 12.0, "model": "m", "data": "d", "seqlen": 8, "windows": 2},
    {"method": "int3", "bits_per_element": 3.5, "ppl": 30.0, "model": "m", "data": "d", "seqlen": 8, "windows": 2},
]


def test_select_rows_keeps_pattern_order_and_each_row_once():
    picked = select_rows(ROWS, "kvquant-3bit*,fp16,kvquant-3bit")
    assert [r["method"] for r in picked] == ["kvquant-3bit", "kvquant-3bit:plain", "fp16"]


def test_marker_with_methods_and_columns(tmp_path):
    _write(tmp_path, ROWS)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:t methods=int3,fp16 columns=method:the name,ppl -->\nold\n<!-- /results -->\nb\n")
    text = render_readme(readme, tmp_path / "res")
    assert "| the name | ppl |" in text
    assert text.index("| int3 |") < text.index("| fp16 |")
    assert "kvquant" not in text and "old" not in text
    assert text.endswith("<!-- /results -->\nb\n")


def test_column_named_by_a_key_holding_a_colon(tmp_path):
    """A pivot's column named after a method with options (`int4:pre-rope`) is that key, not key `int4` headed
    `pre-rope`."""
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "t.json").write_text(json.dumps([{"task": "x", "fp16": "0.9", "int4:pre-rope": "0.8"}]))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:t columns=task:what,int4:pre-rope -->\n<!-- /results -->\n")
    text = render_readme(readme, tmp_path / "res")
    assert "| what | int4:pre-rope |" in text and "| x | 0.8 |" in text


def test_marker_unknown_option_is_an_error(tmp_path):
    _write(tmp_path, ROWS)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:t rowz=fp16 -->\n<!-- /results -->\n")
    with pytest.raises(ValueError, match="rowz"):
        render_readme(readme, tmp_path / "res")


def test_dotted_column_reads_nested_values():
    from kvpack.evaluate.results import markdown_table

    rows = [{"method": "a", "noise": {"min": -0.0125}}, {"method": "b"}]
    text = markdown_table(rows, [("method", "method"), ("noise.min", "band low")])
    assert "| a | -0.013 |" in text and "| b | - |" in text


FIGURE_ROWS = [
    {"method": "fp16", "bits_per_element": 16.0, "ppl": 10.0, "delta_pct": 0.0, "model": "smollm2-135m", "data": "wikitext2", "windows": 8, "mode": "simulated"},
    {"method": "int4", "bits_per_element": 4.5, "ppl": 11.0, "delta_pct": 10.0, "model": "smollm2-135m", "data": "wikitext2", "windows": 8, "mode": "simulated"},
    {"method": "int4:pre-rope", "bits_per_element": 4.5, "ppl": 11.0, "delta_pct": 10.0, "model": "smollm2-135m", "data": "wikitext2", "windows": 8},
    {"method": "kvquant-3bit", "bits_per_element": 3.1, "ppl": 10.5, "delta_pct": 5.0, "model": "smollm2-135m", "data": "wikitext2", "windows": 8,
     "calibration": {"data": "self"}},
    {"method": "nf4", "bits_per_element": 4.5, "ppl": 12.0, "delta_pct": 20.0, "model": "smollm2-135m", "data": "c4[500:]", "windows": 8},
]


def test_figure_points_pick_presets_on_wikitext2_with_c4_or_no_calibration(tmp_path):
    from kvpack.evaluate.report import figure_points

    _write(tmp_path, FIGURE_ROWS)
    more = dict(FIGURE_ROWS[1], windows=16, delta_pct=12.0)
    (tmp_path / "res" / "u.json").write_text(json.dumps([more]))
    points = figure_points(tmp_path / "res")
    assert [(p["method"], p["delta_pct"], p["source"]) for p in points] == [("int4", 12.0, "u.json")]


def test_report_check_fails_on_stale_docs_and_figure(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvpack.cli.app import app

    _write(tmp_path, FIGURE_ROWS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("![f](fig.png)\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("<!-- results:t methods=int4 -->\nold\n<!-- /results -->\n")
    args = ["report", "--results", "res", "--figure", "fig.png"]  # docs/results.md: beside README.md
    stale = CliRunner().invoke(app, args + ["--check"])
    assert stale.exit_code == 1 and "docs/results.md" in stale.output and "fig.png" in stale.output
    assert CliRunner().invoke(app, args).exit_code == 0
    assert "| int4 |" in (tmp_path / "docs" / "results.md").read_text() and (tmp_path / "fig.png").is_file()
    assert CliRunner().invoke(app, args + ["--check"]).exit_code == 0
    rows = FIGURE_ROWS[:1] + [dict(FIGURE_ROWS[1], delta_pct=11.0)]
    (tmp_path / "res" / "t.json").write_text(json.dumps(rows))
    again = CliRunner().invoke(app, args + ["--check"])
    assert again.exit_code == 1 and "fig.png" in again.output
