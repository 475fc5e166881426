"""Calibration text the model writes itself (`data="self"`), for models that come without text.

Each window starts with the tokenizer's BOS token (when it has one) and the first token of a
neutral opening word ("The", "In", ...; one per window, in turn), then the model samples the rest
(temperature 1, top-p 0.95, special tokens suppressed so it keeps writing) from a fixed seed.
All windows are generated together as one batch. The token ids are used as generated (no
detokenize/retokenize) and kept on disk under `cache_root()/self-data/`, keyed by the model,
its weights, the window shape, the seed and `SELF_DATA_VERSION`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

from kvpack.errors import DataError
from kvpack.hf.models import cache_root
from kvpack.recipes.io import model_identity, weights_fingerprint
from transformers import StoppingCriteria, StoppingCriteriaList
from tqdm.auto import tqdm

SELF_SPEC = "self"
SELF_DATA_VERSION = 1
OPENINGS = ["The", "In", "A", "This", "When", "It", "One", "We", "There", "After", "For", "Many", "If", "Our", "Each", "Today"]
TOP_P = 0.95


def describe_self_data(windows: int, seqlen: int, seed: int = 0) -> str:
    return (f"{windows} windows of {seqlen} tokens sampled from the model itself (BOS + an opening word, "
            f"temperature 1, top-p {TOP_P}, seed {seed})")


def _prompts(tokenizer, windows: int) -> torch.Tensor:
    """[windows, 1 or 2]: BOS (if any) and the first token of an opening word per window."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for i in range(windows):
        first = tokenizer(OPENINGS[i % len(OPENINGS)], add_special_tokens=False)["input_ids"][:1]
        rows.append(bos + first)
    return torch.tensor(rows, dtype=torch.long)


def _cache_file(model, windows: int, seqlen: int, seed: int):
    payload = {"model": model_identity(model), "weights": weights_fingerprint(model), "windows": windows,
               "seqlen": seqlen, "seed": seed, "top_p": TOP_P, "version": SELF_DATA_VERSION}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "self-data" / f"{key}.pt"


def _limit(model) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def generate_self_windows(model, tokenizer, windows: int, seqlen: int, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """ids [windows, seqlen] sampled from the model (see module docstring); no disk cache."""

    limit = _limit(model)
    if limit is not None and seqlen > limit:
        raise DataError(f"Self-generated calibration windows of {seqlen} tokens exceed the model's {limit}; use a smaller --seqlen.")
    prompts = _prompts(tokenizer, windows).to(model.device)
    if seqlen <= prompts.shape[1]:
        raise DataError(f"seqlen {seqlen} is too short for self-generated windows; use at least {prompts.shape[1] + 1}.")
    bar = tqdm(total=seqlen - prompts.shape[1], desc=f"writing {windows} calibration windows", unit="token",
               disable=not progress)

    class _Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    special = sorted(set(tokenizer.all_special_ids))
    new = seqlen - prompts.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             top_p=TOP_P, top_k=0, max_new_tokens=new, min_new_tokens=new,
                             suppress_tokens=special or None, pad_token_id=special[0] if special else 0,
                             stopping_criteria=StoppingCriteriaList([_Tick()]))
    bar.close()
    return ids[:, :seqlen].cpu()


def self_windows(model, tokenizer, windows: int, seqlen: int, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Self-generated calibration ids [windows, seqlen], from the disk cache or generated (and cached)."""
    path = _cache_file(model, windows, seqlen, seed)
    if path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
            if tuple(ids.shape) == (windows, seqlen):
                return ids
        except (OSError, RuntimeError, EOFError):
            pass
    if progress:
        print(f"writing calibration text with the model itself: {describe_self_data(windows, seqlen, seed)}",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    ids = generate_self_windows(model, tokenizer, windows, seqlen, seed, progress)
    if progress:
        print(f"wrote {ids.numel()} tokens in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ids, tmp)
    tmp.replace(path)
    return ids
