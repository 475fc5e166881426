"""Options shared by the `kvpack` commands, declared once as `Annotated` aliases, and the error exit."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

Model = Annotated[str, typer.Option(help="Short name, local directory, hub id, or .gguf file.")]
Methods = Annotated[str, typer.Option(help="Comma-separated methods; options follow ':' (int4:pre-rope:key-channel).")]
Method = Annotated[str, typer.Option(help="Method, options after ':' (kvquant-3bit-1pct:sink4).")]
Data = Annotated[str, typer.Option(help="wikitext2 | c4 | PATH (.jsonl with 'text', or plain text); c4[500:] slices documents.")]
CalibData = Annotated[str, typer.Option(
    help="Calibration text for methods that need it: c4[:500] (default; evaluate C4 on c4[500:] to stay held out), "
         "wikitext2, PATH, or 'self' (text the model generates itself).")]
CalibWindows = Annotated[int, typer.Option(help="Calibration windows.")]
Seqlen = Annotated[int, typer.Option(help="Tokens per window.")]
RecipeDir = Annotated[Optional[Path], typer.Option("--recipe", help="Use this saved recipe folder instead of calibrating.")]
Recalibrate = Annotated[bool, typer.Option(help="Calibrate afresh even when kvpack ships or has cached a recipe for this model and method.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the rows to this JSON file.")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
PromptFile = Annotated[Optional[Path], typer.Option(help="UTF-8 text file used as the prompt.")]


def split_methods(methods: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [m.strip() for m in methods.split(",") if m.strip()]


def fail(exc: Exception) -> NoReturn:
    """Print `error: ...` in red on stderr and exit with status 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def log(text: str) -> None:
    """A progress line on stderr."""
    typer.echo(text, err=True)
