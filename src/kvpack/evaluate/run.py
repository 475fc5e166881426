"""`run_eval`: perplexity of several methods on one model and text, next to fp16, as result rows.

What `kvpack eval` runs. Rows carry the method, bits per element, perplexity and NLL, the setting
(model, data, seqlen, windows, mode), timings, the recipe's calibration description and the
environment; KL divergence / top-1 agreement and a bits breakdown are included when the
perplexity result carries them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from kvpack.data import load_windows
from kvpack.errors import KVPackError
from kvpack.evaluate.perplexity import simulated_perplexities
from kvpack.evaluate.results import add_deltas, environment, read_rows, write_rows
from kvpack.evaluate.streaming import streaming_perplexity
from kvpack.finetune.train import apply_finetuned
from kvpack.hf.models import describe_weights, load_model
from kvpack.methods.names import parse_method
from kvpack.recipes.resolve import resolve_recipe
import sys

CACHE_MODES = {"simulated": ["simulated"], "real": ["real"], "both": ["simulated", "real"]}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_eval(
    model_spec: str, data: str, methods: list[str], seqlen: int, max_windows: Optional[int],
    pre_rope: Optional[bool] = None, key_axis: Optional[str] = None, calib_data: str = "c4[:500]",
    calib_windows: int = 16, recipe_dir: Optional[Path] = None, progress: bool = True,
    cache: str = "simulated", chunk: int = 1, json_out: Optional[Path] = None, resume: bool = False,
    finetuned: Optional[Path] = None, recalibrate: bool = False, log: Callable[[str], None] = _stderr,
    calib_seqlen: Optional[int] = None,
) -> list[dict]:
    """Evaluate `methods` (fp16 always included, first) and return result rows.

    cache: "simulated" (quantize-dequantize inside one forward), "real" (stream each window through
    CompressedCache, prefilling `chunk` tokens at a time) or "both" (one row per mode).
    With `json_out` the rows are written after every method, so a long run keeps what it finished;
    `resume` keeps the rows already in `json_out` for the same model, data, seqlen and windows.
    `finetuned` (a `kvpack finetune` output) merges its LoRA adapter into the model for every row
    (the fp16 row is then the tuned model's) and gives its method the tuned codebooks; rows say
    `model = "<model>+<folder name>"`. `recalibrate` ignores shipped and cached recipes.
    `calib_seqlen` (default: `seqlen`) is the calibration window length: long evaluations can reuse the
    recipes calibrated on shorter windows.
    `log` receives one line per finished row."""
    modes = cache_modes(cache)
    settings = [parse_method(m, pre_rope=pre_rope, key_axis=key_axis) for m in methods]
    if not any(s.name == "fp16" for s in settings):
        settings.insert(0, parse_method("fp16"))
    model, tokenizer = load_model(model_spec)
    tuned = None
    if finetuned is not None:
        tuned = apply_finetuned(model, finetuned)
        model_spec = f"{model_spec}+{Path(finetuned).name}"
        if not any(s.name == tuned.settings.name for s in settings):
            settings.append(tuned.settings)
    windows = load_windows(tokenizer, data, seqlen, max_windows)
    rows = []
    if resume and json_out is not None and Path(json_out).is_file():
        same = dict(model=model_spec, data=data, seqlen=seqlen, windows=len(windows))
        rows = [r for r in read_rows(json_out) if all(r.get(k) == v for k, v in same.items())]
    pending = []  # (settings, recipe, modes to run)
    for s in settings:
        todo = [m for m in modes if not any(r["method"] == s.name and r["mode"] == m for r in rows)]
        if not todo:
            continue
        if tuned is not None and s.name == tuned.settings.name:
            recipe = tuned
        else:
            recipe = resolve_recipe(model, tokenizer, s, calib_data=calib_data, calib_windows=calib_windows,
                                    calib_seqlen=calib_seqlen or seqlen, recipe_dir=recipe_dir, progress=progress,
                                    recalibrate=recalibrate)
        pending.append((s, recipe, todo))

    def finish(result, recipe, mode: str) -> None:
        row = eval_row(result, recipe, model_spec, data, seqlen, mode, chunk)
        log(row_summary(row))
        rows.append(row)
        if json_out is not None:
            write_rows(json_out, add_deltas(rows))

    # simulated rows together, window by window: each window's reference forward serves every method
    simulated = [(s, recipe) for s, recipe, todo in pending if "simulated" in todo]
    if simulated:
        results = simulated_perplexities(model, windows, [recipe for _, recipe in simulated], progress=progress)
        for (_, recipe), result in zip(simulated, results):
            finish(result, recipe, "simulated")
    for _, recipe, todo in pending:
        if "real" in todo:
            finish(streaming_perplexity(model, windows, recipe, chunk=chunk, progress=progress), recipe, "real")
    order = {s.name: i for i, s in enumerate(settings)}
    rows.sort(key=lambda r: (order.get(r["method"], len(settings)), r["mode"] != "simulated"))
    if json_out is not None:
        write_rows(json_out, add_deltas(rows))
    return add_deltas(rows)


def cache_modes(cache: str) -> list[str]:
    """The perplexity modes `cache` asks for ("simulated", "real", "both")."""
    if cache not in CACHE_MODES:
        raise KVPackError(f"--cache must be one of {', '.join(CACHE_MODES)}, got '{cache}'.")
    return CACHE_MODES[cache]


def _plain(value):
    """A JSON-ready copy of a bits breakdown (dataclass, mapping or number)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, dict) else value


def eval_row(result, recipe, model_spec: str, data: str, seqlen: int, mode: str, chunk: int) -> dict:
    """One result row of a perplexity result (simulated or real cache)."""
    row = {
        "method": result.method, "bits_per_element": result.bits_per_element, "ppl": result.ppl,
        "nll": result.nll, "model": model_spec, "model_weights": describe_weights(model_spec), "data": data, "seqlen": seqlen, "windows": result.windows,
        "tokens": result.tokens, "mode": mode, "seconds": result.seconds,
        "seconds_per_window": result.seconds / result.windows, "calibration": recipe.calibration or None,
        "env": environment(),
    }
    for key in ("kl", "top1", "fixed_bytes", "marginal_bits_per_element"):
        value = getattr(result, key, None)
        if value is not None:
            row[key] = value
    bits = getattr(result, "bits", None)
    if bits is not None:
        row["bits"] = _plain(bits)
    if mode == "real":
        row["chunk"] = chunk
    elif recipe.settings.recent_tokens:  # recipes/simulate.py: each query reads its own recent window in fp16
        row["recent_window"] = "per query"
    return row


def row_summary(row: dict) -> str:
    """'method [mode]: ppl ...  bits/elem ... (time)' for a row."""
    extra = "".join(f"  {k} {row[k]:.4f}" for k in ("kl", "top1") if isinstance(row.get(k), (int, float)))
    return (f"{row['method']} [{row['mode']}]: ppl {row['ppl']:.4f}  bits/elem {row['bits_per_element']:.3f}{extra}  "
            f"({row['seconds']:.1f} s, {row['seconds_per_window']:.2f} s/window)")
