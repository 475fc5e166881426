"""One attention layer of a CompressedCache: the transformers 5.x cache-layer contract over packed storage.

`update(keys, values)` receives this step's post-RoPE keys and values [batch, kv_heads, q, head_dim],
stores them (keys rotated back to pre-RoPE first when the recipe says so), and returns every
stored token dequantized, keys rotated forward again at their stored positions. Nothing but the
fp16 sink/window and the encoded blocks stays in memory between steps.

Sliding-window layers (Gemma2/3 style) free what leaves the window at a fixed grid of
`block_tokens` tokens, so every sliding layer holds the same token range (the sliding mask is
built once, from the first sliding layer).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpack.cache.stream import TokenStream
from kvpack.codecs import Codec
from kvpack.hf.rope import apply_rope, invert_rope
from kvpack.codecs.checks import check_storable


class CompressedLayer(CacheLayerMixin):
    """Keys and values of one layer in a CompressedCache."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache, layer_idx: int, key_codec: Codec, value_codec: Codec, sliding_window: int | None = None):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.key_codec, self.value_codec = key_codec, value_codec
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.k: TokenStream | None = None
        self.v: TokenStream | None = None

    # -- contract: sizes ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_codec, self.value_codec = self.key_codec.to(self.device), self.value_codec.to(self.device)
        head = self.cache.head_tokens
        block = self.cache.block_tokens if self.is_sliding else None
        self.k = TokenStream(self.key_codec, head, self.cache.recent_tokens, block)
        self.v = TokenStream(self.value_codec, head, self.cache.recent_tokens, block)
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

    # -- contract: update ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slot = self.k.seen
        q = key_states.shape[-2]
        keys = key_states.float()
        check_storable(keys, f"layer {self.layer_idx} keys")
        check_storable(value_states, f"layer {self.layer_idx} values")
        pre_rope = self.cache.pre_rope
        if pre_rope or self.cache.needs_positions:
            cos, sin, positions = self.cache.take_rope(self.layer_idx, key_states)
            self.cache.log_positions(slot, positions)
            if pre_rope:
                self.cache.rope.verify(self.layer_idx, positions, cos, sin, key_states)
                keys = invert_rope(keys, cos.float(), sin.float())
        self.k.append(keys)
        self.v.append(value_states.float())
        packed = getattr(self.cache, "packed", None)
        if packed is not None and packed.claim(self.layer_idx, q):
            return packed.placeholders(self, key_states)  # attention reads the packed storage (kvpack.kernels.dispatch)
        out = self.read_all()
        if self.is_sliding:
            self._free_outside_window()
        return out

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token dequantized, keys rotated at their positions: ([B, H, stored, D], same) in the
        model's dtype."""
        out_k = self.k.read(torch.float32)
        if self.cache.pre_rope:
            cos, sin = self.cache.rope_for(self.layer_idx, self.first_slot, self.k.seen)
            out_k = apply_rope(out_k, cos.float(), sin.float())
        return out_k.to(self.dtype), self.v.read(self.dtype)

    def _free_outside_window(self) -> None:
        """Free tokens the next query cannot see (older than the last window - 1), on the block grid."""
        slot = self.k.seen - self.sliding_window + 1
        head, block = self.cache.head_tokens, self.cache.block_tokens
        if slot < head or slot <= self.k.dropped:
            return
        target = head + (slot - head) // block * block
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
