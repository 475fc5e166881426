"""Retrieval results as tables (terminal, and a pivot for the docs) and a heat map per method."""
from __future__ import annotations

from pathlib import Path


def cell_text(row: dict) -> str:
    """'0.85 (0.64-0.95) n=20': accuracy, Wilson 95% interval, trials."""
    return f"{row['accuracy']:.2f} ({row['ci_low']:.2f}-{row['ci_high']:.2f}) n={row['trials']}"


def lost(row: dict, base: dict | None) -> tuple[int, int] | None:
    """(trials the baseline answered right and `row` got wrong, trials the baseline answered right), over the trial
    indices both ran; None without a baseline or for the baseline itself."""
    if base is None or base is row:
        return None
    mine = {r["index"]: r["correct"] for r in row["results"]}
    right = [r["index"] for r in base["results"] if r["correct"] and r["index"] in mine]
    return sum(not mine[i] for i in right), len(right)


def table(rows: list[dict]) -> str:
    """Plain text: one line per task and length, one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = max(len(m) for m in methods + ["0.00 (0.00-0.00) n=000"]) + 2
    lines = [f"{'task':<15}{'length':>7}  " + "".join(f"{m:<{width}}" for m in methods),
             "accuracy (Wilson 95% interval) n=trials; exact match"]
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
        cells = {r["method"]: r for r in rows if r["task"] == task and r["length"] == length}
        lines.append(f"{task:<15}{length:>7}  " + "".join(f"{cell_text(cells[m]) if m in cells else '-':<{width}}" for m in methods))
    return "\n".join(lines)


def seconds_per_answer(row: dict) -> str:
    """Mean wall-clock seconds per answer of a cell (prefill, decoding and scoring), '-' when not recorded."""
    return f"{row['seconds'] / row['trials']:.0f}" if row.get("seconds") and row.get("trials") else "-"


def pivot(rows: list[dict], baseline: str = "fp16") -> list[dict]:
    """One row per task and length: an 'accuracy (interval), lost k/n' string per method (k of the n trials the
    baseline answered right that this method got wrong), the trials and mean seconds per answer of each (in method
    order, '/'-separated), and the model, haystack, seed and prefill mode."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
        cells = {r["method"]: r for r in rows if r["task"] == task and r["length"] == length}
        line = {"task": task, "length": length, "trials": "/".join(str(cells[m]["trials"]) for m in methods if m in cells),
                "seconds": "/".join(seconds_per_answer(cells[m]) for m in methods if m in cells)}
        line.update({k: next(iter(cells.values()))[k] for k in ("model", "haystack", "seed", "prefill") if k in next(iter(cells.values()))})
        for method in methods:
            if method not in cells:
                line[method] = None
                continue
            row, pair = cells[method], lost(cells[method], cells.get(baseline))
            line[method] = f"{row['accuracy']:.2f} ({row['ci_low']:.2f}-{row['ci_high']:.2f})" + (f", lost {pair[0]}/{pair[1]}" if pair else "")
        out.append(line)
    return out


def by_depth(row: dict) -> dict[float, tuple[int, int]]:
    """depth -> (hits, trials) of one cell."""
    out: dict[float, tuple[int, int]] = {}
    for result in row["results"]:
        hits, trials = out.get(result["depth"], (0, 0))
        out[result["depth"]] = (hits + int(result["correct"]), trials + 1)
    return dict(sorted(out.items()))


def heatmap(rows: list[dict], path: str | Path) -> Path:
    """One panel per method: accuracy by (task, length) rows and target depth columns, trials in each square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    depths = sorted({res["depth"] for r in rows for res in r["results"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 0.75 * len(depths) * len(methods) + 1.4, 0.5 * len(lines) + 1.6),
                             squeeze=False)
    image = None
    for ax, method in zip(axes[0], methods):
        grid, notes = [], []
        for task, length in lines:
            row = next((r for r in rows if r["method"] == method and r["task"] == task and r["length"] == length), None)
            cells = by_depth(row) if row else {}
            grid.append([cells[d][0] / cells[d][1] if d in cells else float("nan") for d in depths])
            notes.append([f"{cells[d][0]}/{cells[d][1]}" if d in cells else "" for d in depths])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lines)), [f"{t} {n}" for t, n in lines] if ax is axes[0][0] else [""] * len(lines))
        ax.set_xlabel("target depth")
        ax.set_title(method, fontsize=9)
        for i, line in enumerate(notes):
            for j, note in enumerate(line):
                ax.text(j, i, note, ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

