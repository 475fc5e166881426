"""One attention layer of a CompressedCache: the transformers 5.x cache-layer contract over packed storage.

`append(keys, values, head_tokens)` stores this step's keys (already pre-RoPE when the recipe says so) and
values [batch, kv_heads, q, head_dim]; `read_all(rope)` returns every stored token dequantized, keys rotated
forward by the cos/sin it is given. Nothing but the fp16 sink/window and the encoded blocks stays in memory
between steps. CompressedCache.update drives both.

Sliding-window layers (Gemma2/3 style) free what leaves the window at a fixed grid of
`block_tokens` tokens, so every sliding layer holds the same token range (the sliding mask is
built once, from the first sliding layer).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpack.cache.stream import TokenStream
from kvpack.codecs import Codec
from kvpack.hf.rope import apply_rope


class CompressedLayer(CacheLayerMixin):
    """Keys and values of one layer in a CompressedCache; it never calls up into the cache: what a step needs
    (pre-RoPE keys, the fp16 head length, cos/sin of the stored positions) comes as arguments from
    CompressedCache.update."""

    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int, key_codec: Codec, value_codec: Codec, recent_tokens: int, block_tokens: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.key_codec, self.value_codec = key_codec, value_codec
        self.recent_tokens, self.block_tokens = recent_tokens, block_tokens
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.k: TokenStream | None = None
        self.v: TokenStream | None = None
        # every attribute exists from construction on, in one order: the instances then share their attribute
        # names (CPython's key-sharing instance dicts, a few hundred bytes less per layer)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    # -- contract: sizes ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, head_tokens: int = 0) -> None:
        """Streams for this layer on the device of key_states (in the model's dtype); `head_tokens` fp16 tokens
        (sink + left padding) first."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_codec, self.value_codec = self.key_codec.to(self.device), self.value_codec.to(self.device)
        block = self.block_tokens if self.is_sliding else None
        self.k = TokenStream(self.key_codec, head_tokens, self.recent_tokens, block)
        self.v = TokenStream(self.value_codec, head_tokens, self.recent_tokens, block)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.seen

    @property
    def first_slot(self) -> int:
        """Index (from the first token ever appended) of the oldest token still stored."""
        return 0 if self.k is None else self.k.dropped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.k is None else self.k.stored
        return stored + query_length, self.first_slot

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    # -- storing and reading ---------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("a CompressedLayer is updated through CompressedCache.update (it needs the step's RoPE)")

    def append(self, keys: torch.Tensor, values: torch.Tensor, head_tokens: int, dtype: torch.dtype) -> None:
        """Store this step's keys (pre-RoPE when the recipe says so) and values, [B, H, q, D] float32; `dtype` is
        the model's, in which reads return."""
        if not self.is_initialized:
            probe = keys.new_empty(0, dtype=dtype)
            self.lazy_initialization(probe, probe, head_tokens)
        self.k.append(keys)
        self.v.append(values)

    def read_all(self, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token dequantized: ([B, H, stored, D], same) in the model's dtype; keys rotated by
        rope = (cos, sin) [B, stored, rot] of their positions when they are stored pre-RoPE."""
        out_k = self.k.read(torch.float32)
        if rope is not None:
            out_k = apply_rope(out_k, rope[0].float(), rope[1].float())
        return out_k.to(self.dtype), self.v.read(self.dtype)

    def free_outside_window(self, head_tokens: int) -> None:
        """Free tokens the next query of a sliding layer cannot see (older than the last window - 1), on the
        block grid after the `head_tokens` fp16 tokens."""
        if not self.is_sliding:
            return
        slot = self.k.seen - self.sliding_window + 1
        block = self.block_tokens
        if slot < head_tokens or slot <= self.k.dropped:
            return
        target = head_tokens + (slot - head_tokens) // block * block
        if target > self.k.dropped:
            self.k.free_first(target - self.k.dropped)
            self.v.free_first(target - self.v.dropped)

    # -- contract: editing ---------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens, or drop the last `-max_length` when negative (DynamicLayer's rule)."""
        if self.k is None:
            return
        keep = max_length if max_length >= 0 else max(self.k.seen + max_length, 0)
        if keep >= self.k.seen:
            return
        self.k.truncate(keep)
        self.v.truncate(keep)

    def reset(self) -> None:
        self.k = self.v = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def map_batch(self, fn) -> None:
        if self.k is not None:
            self.k.map_batch(fn)
            self.v.map_batch(fn)

    def offload(self) -> None:  # packed storage stays where it is
        pass

    def prefetch(self) -> None:
        pass
