"""Render saved JSON results into README sections between `<!-- results:NAME -->` markers.

A marker may select rows and columns of results/NAME.json:
`<!-- results:NAME methods=fp16,kvquant-3bit* columns=method:method,ppl:ppl -->` keeps rows whose
`method` matches one of the glob patterns (in the order of the patterns) and shows the listed
`key:header` columns (header optional; default: the perplexity columns or every key).
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from kvpack.evaluate.results import PPL_COLUMNS, markdown_table, read_rows

_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w./-]+)(?P<options>[^>]*?) -->\n)(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


def describe(rows: list[dict]) -> str:
    first = rows[0]
    labels = [("model", "model `{}`"), ("data", "data `{}`"), ("seqlen", "seqlen {}"), ("windows", "{} windows"),
              ("mode", "mode {}"), ("device", "device {}")]
    # only what every row shares (a column shows what differs)
    parts = [fmt.format(first[key]) for key, fmt in labels
             if first.get(key) is not None and all(r.get(key) == first[key] for r in rows)]
    return ("Measured on " + ", ".join(parts) + ".") if parts else ""


def parse_options(text: str) -> dict[str, str]:
    """'methods=a,b columns=x:y' -> {'methods': 'a,b', 'columns': 'x:y'}; unknown keys are an error."""
    options = {m[1]: m[2].strip() for m in re.finditer(r"(\w+)=(.*?)(?=\s+\w+=|$)", text.strip())}
    unknown = set(options) - {"methods", "columns"}
    if unknown:
        raise ValueError(f"unknown results-marker option(s) {sorted(unknown)}; use methods= and columns=")
    return options


def select_rows(rows: list[dict], patterns: str | None) -> list[dict]:
    """Rows whose method matches the comma-separated glob patterns, in pattern order, each row once."""
    if not patterns:
        return rows
    out: list[dict] = []
    for pattern in patterns.split(","):
        out += [r for r in rows if fnmatch.fnmatchcase(str(r.get("method")), pattern) and r not in out]
    return out


def render_file(path: Path, options: dict[str, str] | None = None) -> str:
    options = options or {}
    rows = select_rows(read_rows(path), options.get("methods"))
    if not rows:
        return f"*(no rows in {path})*\n"
    if options.get("columns"):
        columns = [(c.split(":", 1) + [c])[:2] for c in options["columns"].split(",")]
        columns = [(key, header) for key, header in columns]
    else:
        columns = PPL_COLUMNS if "ppl" in rows[0] else [(k, k) for k in rows[0]]
    return f"{markdown_table(rows, columns)}\n\n{(describe(rows) + ' ').lstrip()}Source: `{path}`.\n"


def render_readme(readme: Path, results_dir: Path) -> str:
    """Return README text with each marked block replaced by the table of results/NAME.json."""
    text = readme.read_text()

    def fill(match: re.Match) -> str:
        path = results_dir / f"{match['name']}.json"
        body = render_file(path, parse_options(match["options"])) if path.is_file() else f"*(not measured yet: {path} is missing)*\n"
        return match.group(1) + body + match["end"]

    return _BLOCK.sub(fill, text)
