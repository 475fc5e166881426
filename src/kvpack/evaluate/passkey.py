"""Passkey retrieval: a 5-digit key hidden at a given depth in filler text, asked for at the end.

The prompt (token ids assembled piece by piece, so its length is exact):
  intro, filler sentences, the needle "The pass key is 12345. Remember it. 12345 is the pass key."
  placed after `depth` of the filler (0 = first, 1 = last), more filler, then
  "What is the pass key? The pass key is".
Each method answers through its real cache: fp16 through a DynamicCache, every recipe through a
CompressedCache (the prompt is prefilled into it, then greedy decoding reads the compressed
storage); a trial passes when the key's digits appear in the first `new_tokens` generated tokens.
Accuracy per (length, depth) over `trials` keys, next to fp16 in the same run; a heat map per method.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from kvpack.hf.attention import cache_kwargs
from transformers import DynamicCache
from kvpack.cache.cache import CompressedCache
from kvpack.methods.names import parse_method
from kvpack.hf.models import load_model
from kvpack.recipes.resolve import resolve_recipe
from kvpack.evaluate.results import environment

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids [1, length] (or shorter if `length` cannot hold the pieces) with the key at `depth`."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    intro, needle, question = _ids(tokenizer, INTRO), _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, QUESTION)
    sentence = _ids(tokenizer, FILLER)
    room = max(length - len(bos) - len(intro) - len(needle) - len(question), 0)
    sentences = room // len(sentence)
    filler = sentence * sentences + sentence[: room - sentences * len(sentence)]
    cut = round(min(max(depth, 0.0), 1.0) * sentences) * len(sentence)  # on a sentence boundary
    ids = bos + intro + filler[:cut] + needle + filler[cut:] + question
    return torch.tensor([ids])


def _cache(model, recipe):
    if recipe is None:
        return DynamicCache(config=model.config)
    return CompressedCache(model, recipe)


@torch.no_grad()
def answer(model, tokenizer, ids: torch.Tensor, recipe, new_tokens: int = 8) -> str:
    """Greedy continuation of `ids` through the method's cache."""
    cache = _cache(model, recipe)
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_passkey(model, tokenizer, recipes: dict, lengths: list[int], depths: list[float], trials: int = 2,
                new_tokens: int = 8, seed: int = 0, log=print) -> list[dict]:
    """Rows {method, length, depth, accuracy, trials, answers} for every method (recipe None = fp16)."""
    rng = random.Random(seed)
    keys = {(length, depth, t): rng.randint(10000, 99999) for length in lengths for depth in depths for t in range(trials)}
    rows = []
    for method, recipe in recipes.items():
        start = time.perf_counter()
        for length in lengths:
            for depth in depths:
                answers, hits = [], 0
                for t in range(trials):
                    key = keys[(length, depth, t)]
                    ids = build_prompt(tokenizer, length, depth, key)
                    text = answer(model, tokenizer, ids, recipe, new_tokens)
                    hits += str(key) in text.replace(" ", "")
                    answers.append({"key": key, "answer": text, "tokens": ids.shape[1]})
                rows.append({"task": "passkey", "method": method, "length": length, "depth": depth,
                             "accuracy": hits / trials, "trials": trials, "answers": answers})
                log(f"{method:<22} length {length:>6} depth {depth:.2f}: {hits}/{trials}")
        log(f"{method}: {time.perf_counter() - start:.0f} s")
    return rows


def table(rows: list[dict]) -> str:
    """Accuracy per method: lengths as rows, depths as columns."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        depths = sorted({r["depth"] for r in mine})
        lengths = sorted({r["length"] for r in mine})
        out.append(f"{method}: accuracy by length (rows) and depth (columns)")
        out.append("length  " + "".join(f"{d:>7.2f}" for d in depths) + "   mean")
        for length in lengths:
            accs = [next(r["accuracy"] for r in mine if r["length"] == length and r["depth"] == d) for d in depths]
            out.append(f"{length:>6}  " + "".join(f"{a:>7.2f}" for a in accs) + f"{sum(accs) / len(accs):>7.2f}")
    return "\n".join(out)


def heatmap(rows: list[dict], path: str | Path) -> Path:
    """One panel per method: accuracy by length and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method]
        depths = sorted({r["depth"] for r in mine})
        lengths = sorted({r["length"] for r in mine})
        grid = [[next(r["accuracy"] for r in mine if r["length"] == n and r["depth"] == d) for d in depths] for n in lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("depth")
        ax.set_ylabel("length (tokens)")
        ax.set_title(method, fontsize=9)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def run_passkey_eval(model_spec: str, methods: list[str], lengths: list[int], depths: list[float], trials: int,
                     calib_data: str, calib_windows: int, calib_seqlen: int, recipe_dir, progress: bool,
                     log=print) -> list[dict]:
    """Load the model, resolve every method's recipe (fp16 first), run the grid; rows with the environment."""

    model, tokenizer = load_model(model_spec)
    names = list(dict.fromkeys(["fp16", *methods]))
    recipes = {}
    for name in names:
        recipes[name] = None if name == "fp16" else resolve_recipe(
            model, tokenizer, parse_method(name), calib_data=calib_data, calib_windows=calib_windows,
            calib_seqlen=calib_seqlen, recipe_dir=recipe_dir, progress=progress)
    rows = run_passkey(model, tokenizer, recipes, lengths, depths, trials, log=log)
    env = environment()
    for row in rows:
        row.update(model=model_spec, env=env)
    return rows


def by_length(rows: list[dict]) -> list[dict]:
    """One row per method and length: accuracy averaged over depths and trials (the README table)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for length in sorted({r["length"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["length"] == length]
            trials = sum(r["trials"] for r in mine)
            out.append({"method": method, "length": length, "depths": [r["depth"] for r in mine], "trials": trials,
                        "accuracy": sum(r["accuracy"] * r["trials"] for r in mine) / trials})
    return out
