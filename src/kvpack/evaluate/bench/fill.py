"""Filling the bench's caches the way generation fills them: a chunked prefill through the model,
then decode steps through the model.

One real prefill feeds every cache: the model runs once over the prompt, chunk by chunk, with a
`TeeCache` (its own DynamicCache, in the prefill model's dtype) that hands every attention layer's
keys/values on to the caches being built, through their own `update()`, and forwards the kvpack
hooks' RoPE and mask reports to them. A CompressedCache therefore stores exactly what it stores when
`generate()` prefills the same prompt in chunks of the same size (blocks, runs, positions), except
that the model attends over the uncompressed history while prefilling (the forward is shared by all
methods). Batch-B caches receive the batch-1 keys/values repeated over B rows (B copies of the
prompt). Each cache then appends decode steps through the model that decodes with it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvpack.hf.attention import attention_layers, cache_kwargs
from kvpack.hf.models import layer_types_and_kwargs, text_config
from kvpack.hf.rope import RopeSource, apply_rope, invert_rope


@dataclass
class Target:
    """One cache being filled: `batch` rows, `context` prompt tokens, decoded later by `model`."""

    method: str
    batch: int
    context: int
    cache: object
    model: object
    storage_dtype: torch.dtype
    compressed: bool
    update_s: float = 0.0  # time spent in this cache's update() during the prefill
    prefill_tokens: int = 0
    extra: dict = field(default_factory=dict)


class TeeCache(DynamicCache):
    """The prefill model's own DynamicCache, handing each layer's K/V and RoPE on to `targets` (see module doc)."""

    def __init__(self, config, targets: list[Target]):
        super().__init__(config=config)
        self.targets = targets

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._feed(key_states, value_states, layer_idx)
        return out

    def _feed(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Hand post-RoPE K/V [1, H, q, D] of one layer to every target through its update()."""
        for t in self.targets:
            start = time.perf_counter()
            k, v = _rows(key_states, t.batch), _rows(value_states, t.batch)
            if t.compressed:
                t.cache.update(k, v, layer_idx)
            else:
                t.cache.update(k.to(t.storage_dtype), v.to(t.storage_dtype), layer_idx)
            t.update_s += time.perf_counter() - start
            if layer_idx == 0:
                t.prefill_tokens += key_states.shape[-2] * t.batch

    @torch.no_grad()
    def replay(self, model, start: int, end: int, chunk: int) -> None:
        """Feed tokens start..end-1 to the targets without a model forward: the K/V this cache holds (the
        tokens prefilled through the model) repeated with their period, keys rotated from their source
        position to the new one; RoPE and positions reported as the hooks report them."""
        period = self.get_seq_length()
        rope = RopeSource(model, attention_layers(model), layer_types_and_kwargs(text_config(model.config))[0])
        device = self.layers[0].keys.device
        for s in range(start, end, chunk):
            pos = torch.arange(s, min(s + chunk, end), device=device).unsqueeze(0)
            src = pos % period
            for idx, layer in enumerate(self.layers):
                cos_new, sin_new = rope.compute(idx, pos, layer.keys.dtype)
                cos_src, sin_src = rope.compute(idx, src, torch.float32)
                keys = layer.keys[..., src[0], :].float()
                keys = apply_rope(invert_rope(keys, cos_src, sin_src), cos_new.float(), sin_new.float())
                self._kvpack_receive_rope(idx, (cos_new, sin_new), pos)
                self._feed(keys.to(layer.keys.dtype), layer.values[..., src[0], :], idx)

    # the kvpack hooks report RoPE and the mask to the cache a forward receives: pass them on
    def _kvpack_receive_rope(self, layer_idx: int, rope, position_ids) -> None:
        for t in self.targets:
            receive = getattr(t.cache, "_kvpack_receive_rope", None)
            if receive is not None:
                receive(layer_idx, rope, position_ids)

    def _kvpack_receive_mask(self, mask) -> None:
        for t in self.targets:
            receive = getattr(t.cache, "_kvpack_receive_mask", None)
            if receive is not None:
                receive(mask if mask is None or t.batch == mask.shape[0] else mask.expand(t.batch, -1))

    @contextmanager
    def paused(self):
        """Forwards through this cache (e.g. decode steps of a baseline sharing it) reach no target."""
        targets, self.targets = self.targets, []
        try:
            yield
        finally:
            self.targets = targets


def _rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x [1, H, q, D] repeated to [batch, H, q, D] (contiguous)."""
    return x if batch == x.shape[0] else x.expand(batch, -1, -1, -1).contiguous()


@torch.no_grad()
def prefill(model, ids: torch.Tensor, tee: TeeCache, start: int, end: int, chunk: int) -> float:
    """Feed tokens start..end-1 of ids [1, T] through `model` with `tee`, `chunk` tokens per forward; seconds."""
    t0 = time.perf_counter()
    for s in range(start, end, chunk):
        model(ids[:, s:min(s + chunk, end)], **cache_kwargs(tee), use_cache=True)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_steps(model, cache, batch: int, steps: int, token: int = 3) -> None:
    """Append `steps` decode steps (one token per row) to `cache` through `model`."""
    ids = torch.full((batch, 1), token, dtype=torch.long, device=model.device)
    for _ in range(steps):
        model(ids, **cache_kwargs(cache), use_cache=True)
