"""The main job of `make demo`: compress the cache of a long prompt and generate next to fp16.

Loads the default model and takes a long prompt (its first `prompt_tokens` tokens): by default
the text shipped with kvpack (`kvpack/texts/kv-cache-guide.txt`, an explanation of KV-cache
compression), or a file (`prompt_file`), or the first long enough article of a WikiText corpus
(`data="wikitext2"`, needs the corpus). It generates a greedy continuation with an ordinary
DynamicCache and one with a CompressedCache built from `method` (the recipe shipped with kvpack
when there is one for the model), and prints the memory the compressed cache held against an
fp16 DynamicCache of the same length, and how many greedy tokens agree.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import torch

from kvpack.cache.cache import CompressedCache
from kvpack.data import load_corpus, tokenize
from kvpack.errors import DataError
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import load_model
from kvpack.recipes.resolve import resolve_recipe

_ARTICLE = re.compile(r"^ = (?!=)(.+?) = $", re.M)
TEXTS_DIR = Path(__file__).resolve().parents[1] / "texts"
SHIPPED_TEXT = "guide"
SHIPPED_TEXT_FILE = TEXTS_DIR / "kv-cache-guide.txt"


def wikitext_articles(text: str) -> list[tuple[str, str]]:
    """(title, body) of each top-level article of raw WikiText (headings ' = Title = ')."""
    heads = list(_ARTICLE.finditer(text))
    return [(m.group(1).strip(), text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)].strip())
            for i, m in enumerate(heads)]


def long_article(tokenizer, data: str, min_tokens: int) -> tuple[str, torch.Tensor]:
    """The first article of `data` with at least `min_tokens` tokens: (title, ids [1, min_tokens])."""
    for title, body in wikitext_articles(load_corpus(data).text):
        ids = tokenize(tokenizer, body)
        if ids.numel() >= min_tokens:
            return title, ids[:min_tokens].unsqueeze(0)
    raise DataError(f"No article in '{data}' has {min_tokens} tokens; ask for a shorter prompt.")


def text_prompt(tokenizer, path: Path, tokens: int, label: str) -> tuple[str, torch.Tensor]:
    """(label, ids [1, n]) of the first `tokens` tokens of the text file `path` (all of it if shorter)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise DataError(f"Prompt file '{path}' cannot be read as UTF-8 text ({exc}).") from exc
    ids = tokenize(tokenizer, text)[:tokens]
    if ids.numel() < 2:
        raise DataError(f"Prompt file '{path}' holds fewer than 2 tokens; give a longer text.")
    return f"{label}, first {ids.numel()} tokens", ids.unsqueeze(0)


def demo_prompt(tokenizer, data: str, prompt_file: str | Path | None, tokens: int) -> tuple[str, torch.Tensor]:
    """The demo's prompt: `prompt_file`, else the shipped text (`data="guide"`), else a WikiText article of `data`."""
    if prompt_file is not None:
        return text_prompt(tokenizer, Path(prompt_file), tokens, f"file {prompt_file}")
    if data == SHIPPED_TEXT:
        return text_prompt(tokenizer, SHIPPED_TEXT_FILE, tokens, f"kvpack's own text {SHIPPED_TEXT_FILE.name}")
    title, ids = long_article(tokenizer, data, tokens)
    return f"{data} article '{title}', first {ids.shape[1]} tokens", ids


@torch.no_grad()
def run_demo(model_spec: str = "smollm2-135m", method: str = "kvquant-4bit-1pct", data: str = SHIPPED_TEXT,
             prompt_tokens: int = 2048, new_tokens: int = 64, calib_windows: int = 16,
             out: Callable[[str], None] = print, prompt_file: str | Path | None = None,
             calib_data: str = "c4[:500]", recalibrate: bool = False) -> dict:
    """Generate from a long prompt with fp16 and with the compressed cache; returns the numbers."""
    model, tokenizer = load_model(model_spec)
    recipe = resolve_recipe(model, tokenizer, method, calib_data=calib_data, calib_windows=calib_windows,
                            recalibrate=recalibrate, progress=True)
    label, prompt = demo_prompt(tokenizer, data, prompt_file, prompt_tokens)
    out(f"prompt: {label}; method {recipe.method}")
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    start = time.perf_counter()
    ref = model.generate(prompt, **gen)[0, prompt.shape[1]:]
    fp16_s = time.perf_counter() - start
    cache = CompressedCache(model, recipe)
    start = time.perf_counter()
    got = model.generate(prompt, **cache_kwargs(cache), **gen)[0, prompt.shape[1]:]
    packed_s = time.perf_counter() - start
    report = cache.memory_report()
    same = got == ref
    agreement = float(same.float().mean())
    first = int((~same).nonzero()[0]) if bool((~same).any()) else new_tokens
    out(f"\n--- fp16 continuation ({fp16_s:.1f} s)\n{tokenizer.decode(ref)}")
    out(f"\n--- {recipe.method} continuation ({packed_s:.1f} s)\n{tokenizer.decode(got)}")
    out(f"\n{report}")
    if cache.packed is not None:
        out(f"decode attention: {cache.packed.summary()}")
    out(f"memory saved: {(report.fp16_total - report.total) / 2**20:.2f} MiB of {report.fp16_total / 2**20:.2f} MiB "
        f"({100 * (1 - report.total / report.fp16_total):.1f}%)")
    out(f"greedy-token agreement with fp16: {agreement:.1%} ({int(same.sum())}/{new_tokens}), first difference at token {first}")
    return {"method": recipe.method, "prompt": label, "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens,
            "agreement": agreement, "first_divergence": first, "bytes": report.total, "fp16_bytes": report.fp16_total,
            "ratio": report.ratio, "bits_per_element": report.bits_per_element, "fp16_seconds": fp16_s,
            "compressed_seconds": packed_s}
