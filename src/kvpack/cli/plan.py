"""`kvpack plan`: longest context and largest batch that fit a memory budget, per method."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import JsonOut, fail, log, split_methods
from kvpack.errors import KVPackError
from kvpack.evaluate.plan import PAPER_CLAIM, format_plan, load_shape, paper_comparison, parse_memory, plan, rows_as_dicts
from kvpack.evaluate.results import write_rows


def plan_command(
    model: str = typer.Option("llama-2-7b", help="Bundled shape (llama-2-7b, llama-2-13b, llama-3-8b, mistral-7b, qwen2-7b, smollm2-135m), a config.json file or folder, or a hub id."),
    memory: str = typer.Option("80GiB", help="Memory budget, e.g. 80GiB, 24GB."),
    method: str = typer.Option("kvquant-2bit-1pct", help="Comma-separated methods; fp16 is always planned."),
    batch: int = typer.Option(1, help="Batch for the longest-context plan."),
    context: Optional[int] = typer.Option(None, help="Context for the largest-batch plan (default: the model's maximum)."),
    json_out: JsonOut = None,
) -> None:
    """Longest context and largest batch that fit in a memory budget, per method next to fp16 (weights, activations, cache).
    The rows go to --json (default results/plan-MODEL-MEMORY.json)."""
    try:
        shape = load_shape(model)
        budget = parse_memory(memory)
        rows = plan(shape, budget, split_methods(method), batch=batch, context=context)
    except KVPackError as exc:
        fail(exc)
    claim = PAPER_CLAIM if shape.name == "llama-2-7b" and any(r.method.startswith("kvquant-2bit") for r in rows) else None
    typer.echo(format_plan(shape, budget, rows, claim))
    out = rows_as_dicts(shape, budget, rows)
    if claim:
        out.append({"paper_comparison": paper_comparison(rows)})
    path = json_out or Path("results") / f"plan-{shape.name.replace('/', '_')}-{memory}.json"
    write_rows(path, out)
    log(f"wrote {path}")
