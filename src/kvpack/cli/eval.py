"""`kvpack eval`: perplexity of methods next to fp16, or passkey retrieval accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import (CalibData, CalibWindows, Data, JsonOut, Methods, Model, Progress, Recalibrate,
                                RecipeDir, Seqlen, fail, log, split_methods)
from kvpack.errors import KVPackError
from kvpack.evaluate import passkey
from kvpack.evaluate.results import PPL_COLUMNS, text_table, write_rows
from kvpack.evaluate.run import run_eval


def eval_command(
    model: Model = "smollm2-135m",
    data: Data = "wikitext2",
    methods: Methods = "fp16,int4,kivi-2",
    seqlen: Seqlen = 2048,
    max_windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows."),
    json_out: JsonOut = None,
    pre_rope: Optional[bool] = typer.Option(None, "--pre-rope/--post-rope", help="Quantize keys before / after RoPE for every method."),
    key_axis: Optional[str] = typer.Option(None, help="'channel' or 'token': the axis keys share statistics along, for every method."),
    calib_data: CalibData = "c4[:500]",
    calib_windows: CalibWindows = 16,
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default: --seqlen)."),
    recipe: RecipeDir = None,
    recalibrate: Recalibrate = False,
    progress: Progress = True,
    cache: str = typer.Option("simulated", help="simulated | real (stream windows through CompressedCache) | both."),
    chunk: int = typer.Option(1, help="With --cache real: tokens fed per forward (1 = the exact decode path)."),
    resume: bool = typer.Option(False, help="Keep rows already in --json for the same model/data/seqlen/windows; run only the rest."),
    task: str = typer.Option("perplexity", help="perplexity | passkey (a 5-digit key in filler text, through the real cache)."),
    lengths: str = typer.Option("1024,2048,4096,8000", help="--task passkey: prompt lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="--task passkey: where the key sits (0 = start, 1 = end)."),
    trials: int = typer.Option(2, help="--task passkey: keys per length and depth."),
    plot: Optional[Path] = typer.Option(None, help="--task passkey: heat map PNG."),
    finetuned: Optional[Path] = typer.Option(None, help="A `kvpack finetune` output: merge its adapter into the model for every row; its method uses the tuned codebooks."),
) -> None:
    """Perplexity of each method (simulated quantization or the real compressed cache), next to fp16 measured in the same run;
    or passkey retrieval accuracy (--task passkey)."""
    if task == "passkey":
        _passkey(model, methods, lengths, depths, trials, calib_data, calib_windows, seqlen, recipe, progress, json_out, plot)
        return
    if task != "perplexity":
        fail(KVPackError(f"unknown --task '{task}' (perplexity | passkey)"))
    try:
        rows = run_eval(model, data, split_methods(methods), seqlen, max_windows, pre_rope, key_axis,
                        calib_data, calib_windows, recipe, progress, cache=cache, chunk=chunk,
                        json_out=json_out, resume=resume, finetuned=finetuned, recalibrate=recalibrate, log=log,
                        calib_seqlen=calib_seqlen)
    except KVPackError as exc:
        fail(exc)
    columns = PPL_COLUMNS if cache == "simulated" else [PPL_COLUMNS[0], ("mode", "cache"), *PPL_COLUMNS[1:]]
    typer.echo(text_table(rows, columns))
    if json_out:
        log(f"wrote {json_out}")


def _passkey(model, methods, lengths, depths, trials, calib_data, calib_windows, seqlen, recipe, progress, json_out, plot) -> None:
    try:
        rows = passkey.run_passkey_eval(model, split_methods(methods), [int(x) for x in lengths.split(",")],
                                        [float(x) for x in depths.split(",")], trials, calib_data, calib_windows,
                                        seqlen, recipe, progress, log=log)
    except KVPackError as exc:
        fail(exc)
    typer.echo(passkey.table(rows))
    if json_out:
        write_rows(json_out, rows)
        summary = Path(json_out).with_name(Path(json_out).stem + "-by-length.json")
        write_rows(summary, passkey.by_length(rows))
        log(f"wrote {json_out} and {summary}")
    if plot:
        log(f"wrote {passkey.heatmap(rows, plot)}")
