"""Latency vs context plot of bench rows (attention alone, whole step), one line per method and batch."""
from __future__ import annotations

import math
from pathlib import Path


def plot(rows: list[dict], path: str | Path) -> Path:
    """Log-log latency vs context; baselines dashed; PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = list(dict.fromkeys((r["method"], r["batch"]) for r in rows))
    for ax, key, title in ((axes[0], "attention_ms", "attention alone (one layer)"),
                           (axes[1], "step_ms", "whole-model decode step")):
        for method, batch in series:
            pts = sorted((r["context"], r[key]) for r in rows
                         if r["method"] == method and r["batch"] == batch and math.isfinite(r[key]))
            if pts:
                base = any(r.get("baseline") for r in rows if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} b{batch}",
                        linestyle="--" if base else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    first = rows[0] if rows else {}
    fig.suptitle(f"{first.get('model', '')} decode latency, {first.get('device_name', '')}, "
                 f"{first.get('threads', '')} timing threads", fontsize=10)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
