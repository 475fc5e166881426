"""`kvpack demo`: the main job, a long prompt's cache compressed, generation next to fp16."""
from __future__ import annotations

import time

import typer

from kvpack.cli.options import Model, fail
from kvpack.errors import KVPackError
from kvpack.evaluate.demo import run_demo


def demo_command(
    model: Model = "smollm2-135m",
    method: str = typer.Option("kvquant-4bit-1pct", help="Recipe for the compressed cache (calibrated on first use, then cached)."),
    data: str = typer.Option("wikitext2", help="Where the long prompt comes from (a WikiText-2 article)."),
    prompt_tokens: int = typer.Option(2048, help="Prompt length in tokens."),
    new_tokens: int = typer.Option(64, help="Tokens to generate greedily."),
    calib_windows: int = typer.Option(4, help="Calibration windows of 2048 C4 tokens for a calibrated method."),
) -> None:
    """The main job: compress a long real prompt's cache, generate next to fp16, report memory and agreement."""
    start = time.perf_counter()
    try:
        run_demo(model, method, data, prompt_tokens, new_tokens, calib_windows, out=typer.echo)
    except KVPackError as exc:
        fail(exc)
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
