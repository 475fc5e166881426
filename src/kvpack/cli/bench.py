"""`kvpack bench`: decode-step latency and memory of caches built the way generation builds them, next to
uncompressed DynamicCache baselines (dynamic-fp32, dynamic-bf16, optionally dynamic-fp16)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import CalibData, JsonOut, Methods, Model, Progress, RecipeDir, fail, log, split_methods
from kvpack.errors import KVPackError
from kvpack.evaluate.results import text_table, write_rows
from kvpack.evaluate.speed import BENCH_COLUMNS, plot, run_bench


def _ints(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def bench_command(
    model: Model = "smollm2-135m",
    device: str = typer.Option("cpu", help="cpu | cuda"),
    contexts: str = typer.Option("2048,8192,32768", help="Comma-separated context lengths (prompt tokens in the cache)."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes (rows decoded together), e.g. 1,8."),
    methods: Methods = "kvquant-4bit-1pct,kvquant-3bit-1pct",
    rounds: int = typer.Option(7, help="Interleaved timing rounds (medians reported)."),
    prefill_chunk: int = typer.Option(2048, help="Tokens per prefill forward (chunked prefill, as generation does)."),
    model_prefill_tokens: int = typer.Option(8192, help="Prompt tokens prefilled through the model; longer contexts "
                                             "repeat their K/V through the same cache path (0: all through the model)."),
    decode_warmup: int = typer.Option(8, help="Decode steps appended through the model before timing."),
    max_cache_gib: float = typer.Option(4.0, help="Skip baselines whose DynamicCache would exceed this."),
    timing_threads: Optional[int] = typer.Option(None, help="torch threads while timing (default: as set)."),
    data: str = typer.Option("wikitext2", help="Text of the prompt."),
    calib_data: CalibData = "c4[:500]",
    calib_windows: int = typer.Option(16, help="Calibration windows. The default is the calibration kvpack ships "
                                      "recipes for, so the default model is timed with the recipes users get; a smaller "
                                      "calibration can change a preset's structure (its self-check may keep one width)."),
    calib_seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    recipe: RecipeDir = None,
    json_out: JsonOut = None,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Latency vs context PNG."),
    progress: Progress = True,
) -> None:
    """Decode-step latency (attention alone, whole model) and memory held, against the fastest uncompressed
    DynamicCache (dynamic-fp32 / dynamic-bf16 / dynamic-fp16: K/V stored in that dtype) of the same run.
    kvpack's own `fp16` method is a compressed-cache row (lossless float16 codec)."""
    try:
        rows = run_bench(model, device, _ints(contexts), _ints(batch), split_methods(methods), rounds=rounds,
                         data=data, calib_data=calib_data, calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                         recipe_dir=recipe, progress=progress, log=log, prefill_chunk=prefill_chunk,
                         model_prefill_tokens=model_prefill_tokens or None, decode_warmup=decode_warmup,
                         max_cache_gib=max_cache_gib, timing_threads=timing_threads)
    except (KVPackError, RuntimeError) as exc:
        fail(exc)
    typer.echo(text_table(rows, BENCH_COLUMNS))
    if rows:
        typer.echo(f"{rows[0]['fill']}; {rows[0]['threads']} timing threads; ratios are against the fastest "
                   "uncompressed DynamicCache of the same context and batch; memory against 16-bit storage")
    if json_out:
        write_rows(json_out, rows)
        log(f"wrote {json_out}")
    if plot_out:
        log(f"wrote {plot(rows, plot_out)}")
