"""`kvpack report`: render the README's result tables from the saved JSON results."""
from __future__ import annotations

from pathlib import Path

import typer

from kvpack.evaluate.report import render_readme


def report_command(
    results: Path = typer.Option(Path("results"), help="Folder of JSON results."),
    readme: Path = typer.Option(Path("README.md"), help="README whose <!-- results:NAME --> blocks are refreshed."),
    check: bool = typer.Option(False, help="Exit 1 if the README is not up to date instead of writing it."),
) -> None:
    """Render the README's result tables from the saved JSON results."""
    text = render_readme(readme, results)
    if check:
        if text != readme.read_text():
            typer.echo(f"{readme} is out of date: run `kvpack report`.", err=True)
            raise typer.Exit(1)
        typer.echo(f"{readme} is up to date.")
        return
    readme.write_text(text)
    typer.echo(f"refreshed {readme} from {results}/")
