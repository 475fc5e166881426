"""Render saved JSON results into README sections between `<!-- results:NAME -->` markers.

A marker may select rows and columns of results/NAME.json:
`<!-- results:NAME methods=fp16,kvquant-3bit* columns=method:method,ppl:ppl -->` keeps rows whose
`method` matches one of the glob patterns (in the order of the patterns) and shows the listed
`key:header` columns (header optional; default: the perplexity columns or every key). A listed column that is a
key of the rows as it stands (e.g. a pivot's method name with options, `int4:pre-rope`) is that key.
"""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from kvpack.hf.models import describe_weights
from kvpack.evaluate.results import PPL_COLUMNS, markdown_table, read_rows

_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w./-]+)(?P<options>[^>]*?) -->\n)(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


def describe(rows: list[dict]) -> str:
    first = rows[0]
    labels = [("model", "model `{}`"), ("data", "data `{}`"), ("seqlen", "seqlen {}"), ("windows", "{} windows"),
              ("mode", "mode {}"), ("device", "device {}")]
    # only what every row shares (a column shows what differs)
    parts = [fmt.format(first[key]) for key, fmt in labels
             if first.get(key) is not None and all(r.get(key) == first[key] for r in rows)]
    text = ("Measured on " + ", ".join(parts) + ".") if parts else ""
    if parts and parts[0].startswith("model ") and describe_weights(first["model"]) != first["model"]:
        text += f" Weights: {describe_weights(first['model'])}."
    return text


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
        keys = {k for r in rows for k in r}
        columns = [(c, c) if c in keys else tuple((c.split(":", 1) + [c])[:2]) for c in options["columns"].split(",")]
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


# -- the quality-vs-bits figure -----------------------------------------------------------------------
FIGURE_DATA = "wikitext2"
FIGURE_CALIBRATION = "c4[:500]"
FAMILIES = ["fp16", "int", "nf", "kivi", "kvquant", "rvq", "turboquant"]
_PRESET = re.compile(r"^[A-Za-z0-9.-]+$")  # a preset name: no ':' options, no variant notes


def _family(method: str) -> str:
    for name in sorted(FAMILIES, key=len, reverse=True):
        if method.startswith(name):
            return name
    return "other"


def _calibration_data(row: dict) -> str | None:
    calibration = row.get("calibration")
    if isinstance(calibration, dict):
        return calibration.get("data")
    return str(row["calib"]).split()[0] if row.get("calib") else None


def figure_points(results_dir: Path) -> list[dict]:
    """One point per preset method (no ':' options or variant notes): WikiText-2 perplexity lost against fp16 of the same run (%)
    and bits per element, from every results/*.json row of the default model (simulated; calibrated on
    c4[:500] when calibrated). RVQ rows count codes + scale (their codebooks are not per token). A method
    measured in several files keeps the row with the most windows."""
    best: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            rows = read_rows(path)
        except (ValueError, TypeError):
            continue
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, dict) or "ppl" not in row or row.get("delta_pct") is None:
                continue
            method = str(row.get("method", ""))
            data = row.get("data") or str(row.get("eval", "")).split("[")[0]
            if not _PRESET.match(method) or method == "fp16" or data != FIGURE_DATA or row.get("model", "smollm2-135m") != "smollm2-135m":
                continue
            if row.get("mode", "simulated") != "simulated" or _calibration_data(row) not in (None, FIGURE_CALIBRATION):
                continue
            bits = row.get("bits_codes_scale") if _family(method) == "rvq" else row.get("bits_per_element")
            if bits is None:
                continue
            windows = row.get("windows") or int(str(row.get("eval", "x16x")).split("[:")[-1].split("x")[0] or 0)
            point = {"method": method, "family": _family(method), "bits": round(float(bits), 4),
                     "delta_pct": round(float(row["delta_pct"]), 4), "windows": windows, "source": path.name}
            if method not in best or point["windows"] > best[method]["windows"]:
                best[method] = point
    return sorted(best.values(), key=lambda p: (p["family"], p["bits"], p["method"]))


def render_figure(results_dir: Path, out: Path) -> Path:
    """Draw perplexity lost (%) against bits per element for every method of `figure_points`; the points
    are stored in the PNG's Description text so `figure_is_current` can check the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = figure_points(results_dir)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = dict(zip(FAMILIES + ["other"], "osD^v*Px"))
    for family in sorted({p["family"] for p in points}):
        mine = [p for p in points if p["family"] == family]
        label = family + (" (codes + scale)" if family == "rvq" else "")
        ax.scatter([p["bits"] for p in mine], [max(p["delta_pct"], 0.01) for p in mine], marker=markers[family], label=label, s=36)
        for p in mine:
            ax.annotate(p["method"], (p["bits"], max(p["delta_pct"], 0.01)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element stored")
    ax.set_ylabel("perplexity lost vs fp16 (%, log scale)")
    ax.set_title("SmolLM2-135M, WikiText-2, simulated quantization (calibrated on c4[:500])", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Description": json.dumps(points, sort_keys=True), "Software": None})
    plt.close(fig)
    return out


def figure_is_current(results_dir: Path, png: Path) -> bool:
    """Whether `png` was rendered from the points the results give now."""
    from PIL import Image

    if not Path(png).is_file():
        return False
    with Image.open(png) as image:
        stored = image.text.get("Description") if hasattr(image, "text") else None
    return stored == json.dumps(figure_points(results_dir), sort_keys=True)
