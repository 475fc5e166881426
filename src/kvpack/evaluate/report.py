"""Render saved JSON results into README sections between `<!-- results:NAME -->` markers."""
from __future__ import annotations

import re
from pathlib import Path

from .results import PPL_COLUMNS, markdown_table, read_rows

_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def describe(rows: list[dict]) -> str:
    first = rows[0]
    parts = [f"model `{first.get('model')}`", f"data `{first.get('data')}`", f"seqlen {first.get('seqlen')}",
             f"{first.get('windows')} windows", f"mode {first.get('mode', 'simulated')}"]
    return "Measured on " + ", ".join(parts) + "."


def render_file(path: Path) -> str:
    rows = read_rows(path)
    if not rows:
        return f"*(no rows in {path})*"
    columns = PPL_COLUMNS if "ppl" in rows[0] else [(k, k) for k in rows[0]]
    return f"{markdown_table(rows, columns)}\n\n{describe(rows)} Source: `{path}`.\n"


def render_readme(readme: Path, results_dir: Path) -> str:
    """Return README text with each marked block replaced by the table of results/NAME.json."""
    text = readme.read_text()

    def fill(match: re.Match) -> str:
        path = results_dir / f"{match['name']}.json"
        body = render_file(path) if path.is_file() else f"*(not measured yet: {path} is missing)*\n"
        return match.group(1) + body + match.group(4)

    return _BLOCK.sub(fill, text)
