"""The main job of `make demo`: compress the cache of a long prompt and generate next to fp16.

Loads the default model and takes a long prompt (its first `prompt_tokens` tokens): by default
the text shipped with kvpack (`kvpack/texts/kv-cache-guide.txt`, an explanation of KV-cache
compression), or a file (`prompt_file`), or the first long enough article of a WikiText corpus
(`data="wikitext2"`, needs the corpus). It generates a greedy continuation with an ordinary
DynamicCache and one with a CompressedCache built from `method` (the recipe shipped with kvpack
when there is one for the model), and prints the memory the compressed cache held against an
fp16 DynamicCache of the same length, and how the two agree: the greedy tokens (which part for
good at the first near-tie) and, along the fp16 continuation, how often the compressed cache
picks the same next token and the mean KL divergence of its next-token distribution.
The prompt ends at the last sentence or line end within `prompt_tokens`, so it is not cut mid-word.
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


_SENTENCE_END = (".", "!", "?", "\n", ".\"", ".)")


def end_at_sentence(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """`ids` [n] cut after its last token that ends a sentence or a line, keeping at least half of it."""
    for end in range(ids.numel(), ids.numel() // 2, -1):
        if tokenizer.decode(ids[end - 1: end]).rstrip(" ").endswith(_SENTENCE_END):
            return ids[:end]
    return ids


def long_article(tokenizer, data: str, min_tokens: int) -> tuple[str, torch.Tensor]:
    """The first article of `data` with at least `min_tokens` tokens: (title, ids [1, min_tokens])."""
    for title, body in wikitext_articles(load_corpus(data).text):
        ids = tokenize(tokenizer, body)
        if ids.numel() >= min_tokens:
            return title, end_at_sentence(tokenizer, ids[:min_tokens]).unsqueeze(0)
    raise DataError(f"No article in '{data}' has {min_tokens} tokens; ask for a shorter prompt.")


def text_prompt(tokenizer, path: Path, tokens: int, label: str) -> tuple[str, torch.Tensor]:
    """(label, ids [1, n]) of the first `tokens` tokens of the text file `path` (all of it if shorter)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise DataError(f"Prompt file '{path}' cannot be read as UTF-8 text ({exc}).") from exc
    ids = end_at_sentence(tokenizer, tokenize(tokenizer, text)[:tokens])
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
def forced_agreement(model, recipe, prompt: torch.Tensor, continuation: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL in nats) of the compressed cache against fp16 along `continuation` [n].

    The prompt [1, p] is prefilled into a CompressedCache, then the continuation but its last token is
    read in one chunk; position i predicts continuation[i] in both models.
    """
    full = torch.cat([prompt, continuation[:-1].unsqueeze(0)], dim=1)
    ref = model(full).logits[0, prompt.shape[1] - 1:].float()
    cache = CompressedCache(model, recipe)
    first = model(prompt, **cache_kwargs(cache)).logits[0, -1:]
    rest = model(continuation[:-1].unsqueeze(0), **cache_kwargs(cache)).logits[0]
    got = torch.cat([first, rest]).float()
    agree = float((got.argmax(-1) == continuation).float().mean())
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return agree, float(kl.sum(-1).mean())


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
    forced, kl = forced_agreement(model, recipe, prompt, ref)
    out(f"\n--- fp16 continuation ({fp16_s:.1f} s)\n{tokenizer.decode(ref)}")
    out(f"\n--- {recipe.method} continuation ({packed_s:.1f} s)\n{tokenizer.decode(got)}")
    out(f"\n{report}")
    if cache.packed is not None:
        out(f"decode attention: {cache.packed.summary()}")
    out(f"memory saved: {(report.fp16_total - report.total) / 2**20:.2f} MiB of {report.fp16_total / 2**20:.2f} MiB "
        f"({100 * (1 - report.total / report.fp16_total):.1f}%)")
    out(f"greedy-token agreement with fp16: {agreement:.1%} ({int(same.sum())}/{new_tokens}), first difference at token {first}")
    out(f"along the fp16 continuation: same next token {forced:.1%} of the time, mean KL {kl:.4f} nats "
        "(free-running greedy texts part for good at the first near-tie)")
    return {"method": recipe.method, "prompt": label, "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens,
            "agreement": agreement, "first_divergence": first,
            "forced_agreement": forced, "forced_kl": kl, "bytes": report.total, "fp16_bytes": report.fp16_total,
            "ratio": report.ratio, "bits_per_element": report.bits_per_element, "fp16_seconds": fp16_s,
            "compressed_seconds": packed_s}
