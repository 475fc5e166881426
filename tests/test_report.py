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
