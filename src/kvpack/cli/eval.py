"""`kvpack eval`: perplexity of methods next to fp16, or passkey retrieval accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import (CalibData, CalibWindows, Data, JsonOut, Methods, Model, Progress, Recalibrate,
                                RecipeDir, Seqlen, fail, log, split_methods)
from kvpack.errors import KVPackError
from kvpack.evaluate import passkey, retrieval
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
    task: str = typer.Option("perplexity", help="perplexity | passkey (a 5-digit key in filler text, through the real cache) "
                                                "| retrieval (RULER-style tasks in natural text, exact match, through the real cache)."),
    lengths: Optional[str] = typer.Option(None, help="--task passkey/retrieval: prompt lengths in tokens (default 1024,2048,4096,8000 / 2048,4096,8192)."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="--task passkey/retrieval: where the key sits (0 = start, 1 = end)."),
    trials: Optional[int] = typer.Option(None, help="--task passkey: keys per length and depth (default 2); --task retrieval: "
                                                    "trials per task, length and method, spread over the depths (default 20)."),
    plot: Optional[Path] = typer.Option(None, help="--task passkey/retrieval: heat map PNG."),
    tasks: str = typer.Option(",".join(retrieval.TASKS), help="--task retrieval: which tasks."),
    seed: int = typer.Option(0, help="--task retrieval: the seed every prompt is generated from."),
    haystack: str = typer.Option("c4[500:]", help="--task retrieval: the natural text around the needles: a data spec "
                                                  "(c4[500:], wikitext2, PATH) or 'guide' (the text shipped with kvpack)."),
    minutes: Optional[float] = typer.Option(None, help="--task retrieval: start no new trial after this many minutes "
                                                       "(cells stay balanced; rerun the same command to continue)."),
    prefill: str = typer.Option("stored", help="--task retrieval: what the prompt's own tokens attend in a compressed cache: "
                                               "stored (keys/values read back from storage) | exact (their full-precision "
                                               "ones, as serving engines attend a prefill)."),
    finetuned: Optional[Path] = typer.Option(None, help="A `kvpack finetune` output: merge its adapter into the model for every row; its method uses the tuned codebooks."),
) -> None:
    """Perplexity of each method (simulated quantization or the real compressed cache), next to fp16 measured in the same run;
    or passkey retrieval accuracy (--task passkey)."""
    if task == "passkey":
        _passkey(model, methods, lengths or "1024,2048,4096,8000", depths, 2 if trials is None else trials, calib_data,
                 calib_windows, seqlen, recipe, progress, json_out, plot)
        return
    if task == "retrieval":
        _retrieval(model, methods, tasks, lengths or "2048,4096,8192", depths, 20 if trials is None else trials, seed,
                   haystack, calib_data, calib_windows, seqlen, recipe, progress, json_out, plot, minutes, prefill)
        return
    if task != "perplexity":
        fail(KVPackError(f"unknown --task '{task}' (perplexity | passkey | retrieval)"))
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


def _retrieval(model, methods, tasks, lengths, depths, trials, seed, haystack, calib_data, calib_windows, seqlen, recipe,
               progress, json_out, plot, minutes, prefill="stored") -> None:
    """Run the missing trials (rows already in --json are kept), print the table, write the pivot and the heat map."""
    try:
        rows = retrieval.run_retrieval_eval(model, split_methods(methods), split_methods(tasks),
                                            [int(x) for x in lengths.split(",")], [float(x) for x in depths.split(",")],
                                            trials, seed, haystack, json_out, calib_data, calib_windows, seqlen, recipe,
                                            progress, log=log, minutes=minutes, prefill=prefill)
    except (KVPackError, ValueError) as exc:
        fail(exc)
    typer.echo(retrieval.table(rows))
    if json_out:
        summary = Path(json_out).with_name(Path(json_out).stem + "-table.json")
        write_rows(summary, retrieval.pivot(rows))
        log(f"wrote {json_out} and {summary}")
    if plot:
        log(f"wrote {retrieval.heatmap(rows, plot)}")
