"""One retrieval answer through a method's real cache: prefill the prompt into it, greedy decoding from it, and
no more tokens than the answer needs.

Generation stops as soon as the answer is decided: once `units` answer units (numbers, or names) are complete,
that is followed by a character that cannot extend them; or after `new_tokens` tokens. Scoring reads only those
first units, so the stop changes no score. The stop looks at the generated text only, never at the expected answer.
"""
from __future__ import annotations

import re

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from kvpack.cache.cache import CompressedCache
from kvpack.hf.attention import cache_kwargs


def complete_units(text: str, pattern: str) -> int:
    """Answer units in `text` that something follows (so no later token can extend or change them)."""
    return sum(1 for m in re.finditer(pattern, text) if m.end() < len(text))


class UnitsDone(StoppingCriteria):
    """Stop generating once the text after the prompt holds `units` complete answer units."""

    def __init__(self, tokenizer, prompt_tokens: int, units: int, pattern: str):
        self.tokenizer, self.prompt_tokens, self.units, self.pattern = tokenizer, prompt_tokens, units, pattern

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_tokens:], skip_special_tokens=True)
        done = complete_units(text, self.pattern) >= self.units
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def make_cache(model, recipe, prefill: str = "stored", prompt_tokens: int = 0):
    """fp16: a DynamicCache; a recipe: a CompressedCache whose prefill of up to `prompt_tokens` tokens decodes the
    stored history and runs the model's own attention (the same stored numbers as the packed path, faster)."""
    if recipe is None:
        return DynamicCache(config=model.config)
    return CompressedCache(model, recipe, prefill=prefill, decoded_chunk_tokens=prompt_tokens)


@torch.no_grad()
def answer(model, tokenizer, ids: torch.Tensor, recipe, new_tokens: int = 12, units: int | None = None,
           pattern: str = r"\d{3,}", prefill: str = "stored") -> str:
    """Greedy continuation of `ids` [1, n] through the method's cache, at most `new_tokens` tokens, stopping once
    `units` answer units matching `pattern` are complete (None: never early)."""
    ids = ids.to(model.device)
    cache = make_cache(model, recipe, prefill, ids.shape[1])
    stop = StoppingCriteriaList([UnitsDone(tokenizer, ids.shape[1], units, pattern)]) if units else None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id, stopping_criteria=stop)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
