"""Result rows of the bench: one per (method, context, batch), with ratios against the fastest uncompressed
baseline (a DynamicCache, any storage dtype) measured in the same run at the same context and batch,
and memory against a 16-bit DynamicCache."""
from __future__ import annotations

import math

from kvpack.evaluate.bench.timing import median

COLUMNS = [
    ("method", "method"), ("storage_dtype", "storage"), ("context", "context"), ("batch", "batch"),
    ("attention_ms", "attn ms"), ("attention_ratio", "attn/fastest"), ("step_ms", "step ms"),
    ("step_ratio", "step/fastest"), ("memory_ratio", "16-bit/cache"), ("cache_bytes", "cache B"),
    ("held_bytes", "held B"), ("attention_kernel", "kernel"),
]


def add_ratios(rows: list[dict]) -> list[dict]:
    """attention_ratio / step_ratio of every row against the fastest baseline row of its (context, batch)."""
    for row in rows:
        group = [r for r in rows if r["context"] == row["context"] and r["batch"] == row["batch"] and r["baseline"]]
        for key in ("attention", "step"):
            timed = [r for r in group if math.isfinite(r[f"{key}_ms"])]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[f"{key}_ms"])
            row[f"{key}_baseline"] = best["method"]
            row[f"{key}_ratio"] = row[f"{key}_ms"] / best[f"{key}_ms"]
            row[f"{key}_cpu_ratio"] = row[f"{key}_cpu_ms"] / best[f"{key}_cpu_ms"]
    return rows


def timing_fields(t) -> dict:
    """Medians and per-round times of one Timings."""
    return {
        "attention_ms": median(t.attention_ms), "step_ms": median(t.step_ms),
        "attention_cpu_ms": median(t.attention_cpu_ms), "step_cpu_ms": median(t.step_cpu_ms),
        "attention_kernel": t.kernel, "attention_ms_rounds": t.attention_ms, "step_ms_rounds": t.step_ms,
    }
