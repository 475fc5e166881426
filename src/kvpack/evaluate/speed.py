"""Decode speed and memory of compressed caches next to the uncompressed DynamicCache baselines.

The implementation lives in kvpack.evaluate.bench (baselines, fill, timing, peak, rows, plot, run);
this module keeps the entry points `run_bench`, `plot` and `BENCH_COLUMNS`.
"""
from kvpack.evaluate.bench import BENCH_COLUMNS, plot, run_bench

__all__ = ["BENCH_COLUMNS", "plot", "run_bench"]
