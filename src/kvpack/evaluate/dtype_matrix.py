"""Every model dtype x attention implementation x method through the real cache, next to the same model's
DynamicCache: the check that no combination a user may load crashes or reads its cache silently wrong.

One cell: the model cast to `dtype` with `attn` attention; a prefill of `prefill` tokens into a
CompressedCache, then teacher-forced decode steps (packed attention: the kernels read the stored bits), and
the same with a DynamicCache. Reported: top-1 agreement of the next-token predictions with the DynamicCache,
the largest logit difference from the same cache read by decode-then-attend (the kernels' exactness), and
the paths that read the decode steps.
"""
from __future__ import annotations

import copy
import math

import torch
from transformers import DynamicCache

from kvpack.cache import CompressedCache
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTIONS = ("sdpa", "eager")


@torch.no_grad()
def _decode_logits(model, ids: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """Next-token logits [B, T - prefill + 1, vocab] (float32): the prefill's last, then one per decode step."""
    out = [model(ids[:, :prefill], **cache_kwargs(cache)).logits[:, -1].float()]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1].float())
    return torch.stack(out, dim=1)


def model_in(model, dtype: torch.dtype, attn: str):
    """A copy of `model` cast to `dtype` with attention implementation `attn`."""
    twin = copy.deepcopy(model).to(dtype)
    twin.set_attn_implementation(attn)
    return twin


@torch.no_grad()
def run_cell(model, recipe: Recipe, ids: torch.Tensor, prefill: int, block_tokens: int = 128) -> dict:
    """One cell on `model` as it is (dtype, attention): top-1 agreement with its DynamicCache and the packed
    path's largest logit difference from decode-then-attend over the same stored bits."""
    reference = _decode_logits(model, ids, prefill, DynamicCache(config=model.config))
    cache = CompressedCache(model, recipe, block_tokens=block_tokens)
    packed = _decode_logits(model, ids, prefill, cache)
    decoded = _decode_logits(model, ids, prefill, CompressedCache(model, recipe, block_tokens=block_tokens,
                                                                  packed_attention=False))
    finite = bool(torch.isfinite(packed).all())
    return {
        "top1": float((packed.argmax(-1) == reference.argmax(-1)).float().mean()),
        "max_logit_diff_vs_decoded": float((packed - decoded).abs().max()) if finite else math.inf,
        "finite": finite,
        "paths": dict(cache.packed.paths) if cache.packed is not None else {},
        "decode_steps": ids.shape[1] - prefill,
    }
