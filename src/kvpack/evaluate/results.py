"""Result rows: written as JSON lists, rendered as tables (terminal and Markdown)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kvpack.kernels import cpu


def environment() -> dict:
    """Where a measurement ran, stored with every result."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu.cpu_model(),
        "instruction_set": cpu.instruction_set(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write `rows` as a JSON list atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a result file: a JSON list, or an object whose `rows` holds the list."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) and "rows" in data else data


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def lookup(row: dict, key: str):
    """row[key], or a nested value for a dotted key ('noise.min_rel_diff'); None when absent."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns; keys may be dotted paths into nested values."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(lookup(r, k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Aligned plain-text table for the terminal."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


PPL_COLUMNS = [
    ("method", "method"),
    ("bits_per_element", "bits/elem"),
    ("ppl", "ppl"),
    ("delta", "delta"),
    ("delta_pct", "delta %"),
]


def add_deltas(rows: list[dict], baseline_method: str = "fp16") -> list[dict]:
    """Add `delta` and `delta_pct` against the baseline row of the same model, data and seqlen."""
    for row in rows:
        base = next(
            (b for b in rows if b["method"] == baseline_method and b.get("mode") == row.get("mode")
             and all(b.get(k) == row.get(k) for k in ("model", "data", "seqlen", "windows"))),
            None,
        )
        if base is not None:
            row["delta"] = row["ppl"] - base["ppl"]
            row["delta_pct"] = 100.0 * (row["ppl"] / base["ppl"] - 1.0)
    return rows
