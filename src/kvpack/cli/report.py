"""`kvpack report`: render the README's and docs/results.md's tables and the quality-vs-bits figure from results/*.json."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import log
from kvpack.evaluate.report import figure_is_current, render_figure, render_readme


def report_command(
    results: Path = typer.Option(Path("results"), help="Folder of JSON results."),
    readme: Path = typer.Option(Path("README.md"), help="README whose <!-- results:NAME --> blocks are refreshed."),
    docs: Optional[Path] = typer.Option(None, help="A second document with result blocks (default: docs/results.md beside the README, if there is one)."),
    figure: Optional[Path] = typer.Option(None, help="Perplexity lost vs bits per element, every method (default: RESULTS/quality-vs-bits.png)."),
    check: bool = typer.Option(False, help="Exit 1 if a document or the figure is not up to date instead of writing them."),
) -> None:
    """Render the result tables of the README (and docs/results.md) and the quality-vs-bits figure from the saved JSON results."""
    docs = docs or readme.parent / "docs" / "results.md"
    figure = figure or results / "quality-vs-bits.png"
    stale = []
    for document in [readme] + ([docs] if docs.is_file() else []):
        text = render_readme(document, results)
        if text == document.read_text():
            continue
        if check:
            stale.append(str(document))
        else:
            document.write_text(text)
            log(f"refreshed {document} from {results}/")
    if check:
        if not figure_is_current(results, figure):
            stale.append(str(figure))
        if stale:
            typer.echo(f"out of date: {', '.join(stale)}; run `kvpack report`.", err=True)
            raise typer.Exit(1)
        typer.echo(f"{readme}{', ' + str(docs) if docs.is_file() else ''} and {figure} are up to date.")
        return
    if not figure_is_current(results, figure):
        log(f"wrote {render_figure(results, figure)}")
    typer.echo("report up to date.")
