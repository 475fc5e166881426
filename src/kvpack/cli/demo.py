"""`kvpack demo`: the main job, a long prompt's cache compressed, generation next to fp16."""
from __future__ import annotations

import time

import typer

from kvpack.cli.options import CalibData, Model, PromptFile, Recalibrate, fail
from kvpack.errors import KVPackError
from kvpack.evaluate.demo import SHIPPED_TEXT, run_demo


def demo_command(
    model: Model = "smollm2-135m",
    method: str = typer.Option("kvquant-4bit-1pct", help="Method of the compressed cache (its recipe ships with kvpack for the default model)."),
    data: str = typer.Option(SHIPPED_TEXT, help=f"Where the long prompt comes from: '{SHIPPED_TEXT}' (a text shipped with kvpack) "
                             "or a corpus of WikiText articles (wikitext2, PATH); --prompt-file overrides it."),
    prompt_file: PromptFile = None,
    prompt_tokens: int = typer.Option(2048, help="Prompt length in tokens (at most; the whole file if shorter)."),
    new_tokens: int = typer.Option(64, help="Tokens to generate greedily."),
    calib_data: CalibData = "c4[:500]",
    calib_windows: int = typer.Option(16, help="Calibration windows of 2048 tokens, when the method needs a calibration kvpack does not ship."),
    recalibrate: Recalibrate = False,
) -> None:
    """The main job: compress a long prompt's cache, generate next to fp16, report memory and agreement."""
    start = time.perf_counter()
    try:
        run_demo(model, method, data, prompt_tokens, new_tokens, calib_windows, out=typer.echo, prompt_file=prompt_file,
                 calib_data=calib_data, recalibrate=recalibrate)
    except KVPackError as exc:
        fail(exc)
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
