"""`kvpack bench`: decode-step latency, compression throughput and memory next to the fp16 cache."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import CalibData, JsonOut, Methods, Model, Progress, RecipeDir, fail, log, split_methods
from kvpack.errors import KVPackError
from kvpack.evaluate.results import text_table, write_rows
from kvpack.evaluate.speed import BENCH_COLUMNS, plot, run_bench


def bench_command(
    model: Model = "smollm2-135m",
    device: str = typer.Option("cpu", help="cpu | cuda"),
    contexts: str = typer.Option("1024,8192,32768", help="Comma-separated context lengths (tokens in the cache)."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    methods: Methods = "fp16,kvquant-4bit-1pct,kvquant-3bit-1pct",
    rounds: int = typer.Option(7, help="Interleaved timing rounds (medians reported)."),
    source_tokens: int = typer.Option(512, help="Tokens of real text whose K/V are repeated to fill the caches."),
    data: str = typer.Option("wikitext2", help="Text the K/V come from."),
    calib_data: CalibData = "c4[:500]",
    calib_windows: int = typer.Option(2, help="Calibration windows (a small calibration is enough for speed)."),
    calib_seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    recipe: RecipeDir = None,
    json_out: JsonOut = None,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Latency vs context PNG."),
    progress: Progress = True,
) -> None:
    """Decode-step latency (attention alone, whole model), compression throughput and memory vs the fp16 cache."""
    try:
        rows = run_bench(model, device, [int(c) for c in contexts.split(",") if c.strip()], batch,
                         split_methods(methods), rounds=rounds, source_tokens=source_tokens, data=data,
                         calib_data=calib_data, calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                         recipe_dir=recipe, progress=progress, log=log)
    except (KVPackError, RuntimeError) as exc:
        fail(exc)
    typer.echo(text_table(rows, BENCH_COLUMNS))
    if rows:
        typer.echo(f"caches filled with {rows[0]['kv_source']}, {rows[0]['fill']}; "
                   f"{rows[0]['threads']} threads; ratios are method / fp16 measured in the same run")
    if json_out:
        write_rows(json_out, rows)
        log(f"wrote {json_out}")
    if plot_out:
        log(f"wrote {plot(rows, plot_out)}")
