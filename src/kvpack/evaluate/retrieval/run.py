"""Run the retrieval grid through each method's real cache, in pieces that add up.

A cell is (task, method, length). Trial `i` of a task and length is the same prompt for every method (generated
from the seed), with its target at depths[i % len(depths)], so `trials` spreads over the depths. Methods answer
through their own cache: fp16 through a DynamicCache, every recipe through a CompressedCache (prefill into it,
greedy decoding from it, stopping once the answer is decided). `prefill` says what the prompt's own tokens attend
(CompressedCache: "stored" = the keys and values read back from storage, "exact" = their full-precision ones, as
serving engines do); fp16 is the same either way. Rows already in the output file are kept and only missing trial indices run; the file
is rewritten after every trial, so an interrupted run resumes where it stopped and a later run with more trials,
tasks, lengths or methods adds to the same file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kvpack.cache.cache import PREFILL_MODES
from kvpack.evaluate.retrieval.answer import answer
from kvpack.evaluate.retrieval.score import exact_match, wilson
from kvpack.evaluate.retrieval.tasks import make_trial
from kvpack.evaluate.retrieval.text import Haystack
from kvpack.evaluate.results import environment, read_rows, write_rows
from kvpack.hf.models import load_model
from kvpack.methods.names import parse_method
from kvpack.recipes.resolve import resolve_recipe

KEYS = ("task", "method", "length", "seed", "haystack", "model", "depths", "prefill")  # a cell; its trials come from these
DEFAULTS = {"prefill": "stored"}  # rows written before a key existed hold its default


def summarize(row: dict) -> dict:
    """Set hits, trials, accuracy and the Wilson 95% interval of a cell from its per-trial results."""
    results = sorted(row["results"], key=lambda r: r["index"])
    hits = sum(r["correct"] for r in results)
    low, high = wilson(hits, len(results))
    row.update(results=results, trials=len(results), hits=hits, accuracy=hits / len(results) if results else None,
               ci_low=low, ci_high=high, ci95=f"{low:.2f}-{high:.2f}")
    return row


def _cell(rows: list[dict], key: dict) -> dict:
    for row in rows:
        if all(row.get(k, DEFAULTS.get(k)) == key[k] for k in KEYS):
            return row
    row = dict(key, results=[], seconds=0.0)
    rows.append(row)
    return row


@torch.no_grad()
def run_retrieval(model, tokenizer, recipes: dict, tasks: list[str], lengths: list[int], depths: list[float],
                  trials: int, seed: int = 0, haystack: str = "c4[500:]", model_name: str = "model",
                  rows: list[dict] | None = None, save: Callable[[list[dict]], None] | None = None,
                  progress: bool = False, extra: dict | None = None, minutes: float | None = None,
                  prefill: str = "stored") -> list[dict]:
    """Rows, one per (task, method, length) cell (recipe None = fp16 DynamicCache), extending `rows`; each holds
    per-trial results {index, depth, position, expected, answer, correct} and its accuracy with a Wilson 95% interval.
    With `minutes`, no new trial index starts after that time, so the cells stay balanced."""
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
    rows = list(rows or [])
    hay = Haystack(tokenizer, haystack)
    todo = []
    for index in range(trials):  # trial by trial across every cell: a run cut short leaves balanced cells
        for task in tasks:
            for length in lengths:
                missing = [m for m in recipes if index not in {r["index"] for r in _cell(rows, dict(
                    task=task, method=m, length=length, seed=seed, haystack=haystack, model=model_name,
                    depths=list(depths), prefill=prefill))["results"]}]
                if missing:
                    todo.append((task, length, index, missing))
    bar = tqdm(total=sum(len(t[3]) for t in todo), desc="retrieval", unit="answer", disable=not progress)
    stop = time.monotonic() + 60 * minutes if minutes else None
    for n, (task, length, index, methods) in enumerate(todo):
        if stop is not None and n and index != todo[n - 1][2] and time.monotonic() > stop:
            break
        trial = make_trial(tokenizer, hay, task, length, index, depths, seed)
        ids = torch.tensor([trial.ids])
        for method in methods:
            start = time.perf_counter()
            units = 1 if trial.mode == "first" else len(trial.expected)
            text = answer(model, tokenizer, ids, recipes[method], trial.new_tokens, units=units, pattern=trial.unit,
                          prefill=prefill)
            row = _cell(rows, dict(task=task, method=method, length=length, seed=seed, haystack=haystack, model=model_name,
                                   depths=list(depths), prefill=prefill))
            row["results"].append({"index": index, "depth": trial.depth, "position": round(trial.position, 4),
                                   "expected": trial.expected, "answer": text,
                                   "correct": exact_match(text, trial.expected, trial.mode, trial.unit)})
            row["seconds"] = round(row.get("seconds", 0.0) + time.perf_counter() - start, 2)
            row.update(extra or {})
            summarize(row)
            bar.update(1)
            bar.set_postfix_str(f"{task} {length} {method} {row['hits']}/{row['trials']}")
            if save:
                save([r for r in rows if r["results"]])
    bar.close()
    return [summarize(r) for r in rows if r["results"]]


def run_retrieval_eval(model_spec: str, methods: list[str], tasks: list[str], lengths: list[int], depths: list[float],
                       trials: int, seed: int, haystack: str, json_out: Path | None, calib_data: str,
                       calib_windows: int, calib_seqlen: int, recipe_dir, progress: bool, log=print,
                       minutes: float | None = None, prefill: str = "stored") -> list[dict]:
    """Load the model, resolve each method's recipe (fp16 first, always), run the missing trials; rows with the environment."""
    model, tokenizer = load_model(model_spec)
    recipes = {}
    for name in dict.fromkeys(["fp16", *methods]):
        recipes[name] = None if name == "fp16" else resolve_recipe(
            model, tokenizer, parse_method(name), calib_data=calib_data, calib_windows=calib_windows,
            calib_seqlen=calib_seqlen, recipe_dir=recipe_dir, progress=progress)
    rows = read_rows(json_out) if json_out and Path(json_out).is_file() else []
    done = sum(len(r.get("results", [])) for r in rows)
    if done:
        log(f"{json_out}: keeping {done} answers in {len(rows)} cells; running the missing trials")
    save = (lambda rs: write_rows(json_out, rs)) if json_out else None
    return run_retrieval(model, tokenizer, recipes, tasks, lengths, depths, trials, seed, haystack, model_spec,
                         rows, save, progress, extra={"env": environment()}, minutes=minutes, prefill=prefill)
