"""`kvpack bench`: decode-step latency and memory of caches built the way generation builds them.

Modules: baselines (the uncompressed DynamicCache rows), fill (prefill + decode appends), timing
(interleaved rounds), peak (process memory), rows (ratios), plot, run (run_bench).
"""
from kvpack.evaluate.bench.plot import plot
from kvpack.evaluate.bench.rows import COLUMNS as BENCH_COLUMNS
from kvpack.evaluate.bench.run import run_bench

__all__ = ["BENCH_COLUMNS", "plot", "run_bench"]
