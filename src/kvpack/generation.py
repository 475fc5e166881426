"""`kvpack.generate`: continue a (long) prompt with the compressed cache, optionally saving the
prompt's cache to a file or continuing from one.

The context is processed once: every token but the last goes through the model into a
CompressedCache (in chunks of `prefill_chunk` tokens); the last token is kept out of the cache and
fed by `model.generate`, which yields the first new token's logits. A saved cache file
(`save_cache`) is the CompressedCache file (`CompressedCache.save`) taken at that point, with the
context's token ids added to its metadata (key "kvpack_context", JSON: ids, method, recipe
folder), so `load_cache` restores the cache, feeds the kept-out last token and continues exactly as
the saving run did; a new prompt given with `load_cache` is appended after the cached tokens.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import TextStreamer

from kvpack.cache.cache import CompressedCache
from kvpack.errors import CacheFileError, DataError, KVPackError
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import DEFAULT_MODEL, load_model, text_config
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.resolve import resolve_recipe
from safetensors.torch import save_file
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

# The kvpack-*bit presets lose less quality per bit and decode faster on the CPU (docs/results.md), but become the
# default only once they also hold what the quality table promises at short lengths, meet the 32K speed target and
# have run on a real GPU (their Triton kernels are checked under the interpreter only).
DEFAULT_METHOD = "kvquant-4bit-1pct"
CONTEXT_KEY = "kvpack_context"


@dataclass
class GenerationResult:
    """A continuation and what it cost: tokens, cache bytes next to an fp16 cache, seconds."""

    text: str
    new_tokens: int
    token_ids: list[int]
    method: str
    context_tokens: int  # tokens before the continuation (cached + new prompt)
    cached_tokens: int  # of those, restored from `load_cache`
    cache_bytes: int
    fp16_bytes: int
    bits_per_element: float
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    report: str = ""
    attention: str = ""  # which code read the decode steps (PackedAttention.summary)

    def as_dict(self) -> dict:
        return asdict(self)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _peak_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib if sys.platform == "darwin" else kib * 1024)


def prompt_ids(tokenizer, text: str, chat: bool = False, continuation: bool = False) -> list[int]:
    """Token ids of `text`: as a user turn of the chat template (`chat`) or plain; a `continuation`
    (text appended after cached tokens) gets no special tokens of its own."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("This tokenizer has no chat template; drop --chat (chat=True) for a base model.")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text, add_special_tokens=not continuation)["input_ids"])


def max_positions(model) -> int | None:
    return getattr(text_config(model.config), "max_position_embeddings", None)


def check_length(model, context: int, new_tokens: int) -> None:
    """DataError if the context plus the new tokens exceed the model's positions."""
    limit = max_positions(model)
    if limit is not None and context + new_tokens > limit:
        raise DataError(
            f"The context has {context} tokens and {new_tokens} new tokens were asked: {context + new_tokens} > "
            f"the model's {limit} positions. Shorten the prompt (file) or lower --max-new-tokens (max_new_tokens)."
        )
    if context < 1:
        raise DataError("Nothing to continue: give a prompt (--prompt-file / prompt=) or a saved cache (--load-cache).")


def save_context(cache: CompressedCache, path: str | Path, ids: list[int], recipe_dir: str | None) -> Path:
    """Save `cache` (holding ids[:-1]) to `path` with the context ids in its metadata."""

    path = Path(cache.save(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata[CONTEXT_KEY] = json.dumps({"ids": ids, "method": cache.recipe.method, "recipe": recipe_dir})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.ctx")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_context(path: str | Path) -> dict:
    """The context saved beside a cache by `save_context`: {"ids", "method", "recipe"}."""

    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"No saved cache at '{path}'. Save one first with --save-cache FILE (save_cache=FILE).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(CONTEXT_KEY)
    except (SafetensorError, OSError) as exc:
        raise CacheFileError(f"'{path}' is not a kvpack cache file ({exc}). Save it again with --save-cache.") from exc
    if raw is None:
        raise CacheFileError(f"'{path}' holds a cache but not its context tokens; it was not saved by `kvpack generate "
                             "--save-cache`. Save it again with --save-cache FILE.")
    context = json.loads(raw)
    if not context.get("ids"):
        raise CacheFileError(f"'{path}' has an empty context; save it again with --save-cache.")
    return context


def _recipe_for(model, tokenizer, method, recipe, saved: dict | None, calib_data, calib_windows, recalibrate, progress):
    if isinstance(recipe, Recipe):
        return recipe, None
    if recipe is None and method is None and saved is not None and saved.get("recipe"):
        recipe = saved["recipe"]
    if recipe is not None:
        return Recipe.load(recipe, model), str(recipe)
    method = method or (saved or {}).get("method") or DEFAULT_METHOD
    return resolve_recipe(model, tokenizer, method, calib_data=calib_data, calib_windows=calib_windows,
                          recalibrate=recalibrate, progress=progress), None


@torch.no_grad()
def _prefill(model, cache: CompressedCache, ids: list[int], chunk: int, progress: bool) -> None:
    start = cache.get_seq_length()
    todo = torch.tensor([ids[start:]], dtype=torch.long, device=model.device)
    bar = tqdm(total=todo.shape[1], desc="reading the prompt", unit="token", disable=not progress or todo.shape[1] <= chunk)
    for s in range(0, todo.shape[1], chunk):
        part = todo[:, s:s + chunk]
        mask = torch.ones(1, start + s + part.shape[1], dtype=torch.long, device=model.device)
        model(input_ids=part, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        bar.update(part.shape[1])
    bar.close()


def generate(
    prompt: str | None = None,
    *,
    model=DEFAULT_MODEL,
    tokenizer=None,
    method: str | None = None,
    recipe: Recipe | str | Path | None = None,
    max_new_tokens: int = 64,
    chat: bool = False,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    save_cache: str | Path | None = None,
    load_cache: str | Path | None = None,
    stream: bool | Callable[[str], None] = False,
    calib_data: str = "c4[:500]",
    calib_windows: int = 16,
    recalibrate: bool = False,
    prefill_chunk: int = 2048,
    progress: bool = False,
    log: Callable[[str], None] = _stderr,
) -> GenerationResult:
    """Continue `prompt` (and/or the context saved in `load_cache`) with a CompressedCache.

    `model`: a loaded model (then pass `tokenizer`) or a spec for `load_model`. The recipe: `recipe`
    (a Recipe or a saved folder), else `method` resolved for the model (shipped, cached or
    calibrated on `calib_data`; `recalibrate` redoes it), else the method saved with `load_cache`,
    else kvquant-4bit-1pct. Greedy unless `sample` (then `temperature`, `seed`). `stream=True`
    prints the continuation to stdout as it is generated. See the module docstring for the files.
    """
    times: dict[str, float] = {}
    start = time.perf_counter()
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model)
        times["load_model"] = time.perf_counter() - start
    elif tokenizer is None:
        raise KVPackError("generate(model=<a loaded model>) needs its tokenizer: pass tokenizer=...")
    if prompt is None and load_cache is None:
        check_length(model, 0, max_new_tokens)
    saved = read_context(load_cache) if load_cache is not None else None
    t = time.perf_counter()
    recipe_obj, recipe_dir = _recipe_for(model, tokenizer, method, recipe, saved, calib_data, calib_windows,
                                         recalibrate, progress)
    times["recipe"] = time.perf_counter() - t
    ids: list[int] = list(saved["ids"]) if saved else []
    if prompt is not None:
        ids += prompt_ids(tokenizer, prompt, chat=chat, continuation=bool(saved))
    check_length(model, len(ids), max_new_tokens)
    t = time.perf_counter()
    if saved is not None:
        cache = CompressedCache.load(load_cache, model, recipe_obj)
        if cache.get_seq_length() != len(saved["ids"]) - 1:
            raise CacheFileError(f"'{load_cache}' holds {cache.get_seq_length()} cached tokens but its context "
                                 f"{len(saved['ids'])}; save it again with --save-cache.")
        times["load_cache"] = time.perf_counter() - t
    else:
        cache = CompressedCache(model, recipe_obj)
    t = time.perf_counter()
    _prefill(model, cache, ids[:-1], prefill_chunk, progress)
    times["prefill"] = time.perf_counter() - t
    if save_cache is not None:
        t = time.perf_counter()
        save_context(cache, save_cache, ids, recipe_dir)
        times["save_cache"] = time.perf_counter() - t
        log(f"saved the cache of {len(ids) - 1} tokens (+1 kept out to continue from) to {save_cache} "
            f"({Path(save_cache).stat().st_size / 2**20:.2f} MiB)")
    streamer = None
    if stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        if callable(stream):
            streamer.on_finalized_text = lambda text, stream_end=False: stream(text)
    eos = tokenizer.eos_token_id
    gen = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
               eos_token_id=eos, streamer=streamer)
    if sample:
        gen.update(temperature=temperature, top_k=0)
    else:
        gen.update(temperature=None, top_p=None, top_k=None)
    context = torch.tensor([ids], dtype=torch.long, device=model.device)
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(context, attention_mask=torch.ones_like(context), **cache_kwargs(cache), **gen)
    times["generate"] = time.perf_counter() - t
    new = out[0, len(ids):].tolist()
    report = cache.memory_report()
    times["total"] = time.perf_counter() - start
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True), new_tokens=len(new), token_ids=new,
        method=recipe_obj.method, context_tokens=len(ids), cached_tokens=len(saved["ids"]) - 1 if saved else 0,
        cache_bytes=report.total, fp16_bytes=report.fp16_total, bits_per_element=report.bits_per_element,
        seconds=times, peak_rss_bytes=_peak_rss(), report=str(report),
        attention=cache.packed.summary() if cache.packed is not None else "decode-then-attend (packed attention off)",
    )
