"""`kvpack calibrate`: calibrate methods for a model and save the recipes."""
from __future__ import annotations

from pathlib import Path

import typer

from kvpack.cli.options import Model, Progress, fail, split_methods
from kvpack.data import describe_data
from kvpack.errors import KVPackError
from kvpack.hf import models
from kvpack.recipes.bundled import write_manifest
from kvpack.recipes.calibrate import calibrate
from kvpack.recipes.self_data import SELF_SPEC, describe_self_data


def calibrate_command(
    model: Model = "smollm2-135m",
    method: str = typer.Option("kvquant-3bit-1pct", help="Calibrated method, options after ':' (kvquant-3bit-1pct:sink4); "
                               "several comma-separated share one pass over the data and go to OUT/METHOD."),
    data: str = typer.Option("c4[:500]", help="Calibration text: c4 | wikitext2 | PATH | self (text the model writes itself); "
                             "c4[:500] (default) slices documents, leaving c4[500:] held out."),
    windows: int = typer.Option(16, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    out: Path = typer.Option(..., help="Folder to write the recipe to (recipe.json + codecs.safetensors)."),
    manifest: bool = typer.Option(False, help="Write every recipe to OUT/METHOD and record in OUT/MANIFEST.json the command, "
                                  "the data, the model and the files' sha256 (how kvpack's shipped recipes are built)."),
    progress: Progress = True,
) -> None:
    """Calibrate a method for a model and save the recipe; use it with `kvpack eval --recipe DIR`."""
    names = split_methods(method)
    try:
        loaded, tokenizer = models.load_model(model)
        recipes = []
        for name in names:
            folder = out / name if manifest or len(names) > 1 else out
            recipe = calibrate(loaded, tokenizer, name, data=data, windows=windows, seqlen=seqlen, progress=progress)
            recipe.save(folder)
            recipes.append(recipe)
            timing = (recipe.calibration or {}).get("timing_s", {})
            typer.echo(f"wrote {folder} ({recipe.method}, {recipe.num_layers} layers"
                       + (f", calibrated in {timing['total']:.1f} s)" if "total" in timing else ")"))
        if manifest:
            described = describe_self_data(windows, seqlen) if data == SELF_SPEC else describe_data(data)
            typer.echo(f"wrote {write_manifest(out, recipes, loaded, model, described)}")
    except KVPackError as exc:
        fail(exc)
