"""CompressedCache: a transformers Cache that keeps every layer's keys and values packed by a recipe.

    cache = CompressedCache(model, recipe)
    model.generate(ids, **cache_kwargs(cache), max_new_tokens=64)
    cache.memory_report()

Per layer (see cache/layer.py and cache/stream.py): the first `sink_tokens` tokens (plus any left
padding) and the recent window (`residual_length`, default the recipe's `recent_tokens`) in fp16;
everything else encoded by the layer's codecs in blocks that later appends never rewrite. With a
pre-RoPE recipe keys are rotated back to pre-RoPE exactly on the way in and rotated forward at
their stored positions on the way out; positions are logged once for all layers ([batch, tokens]
int32), so left padding and custom position ids work. Attention reads decode the stored blocks
(nothing full-precision is kept between steps); a packed-attention path can read `layer.k.body`
directly later.

What a prefill chunk (a call with more than one new token) attends: with `prefill="stored"` (the default)
every token it can see, its own included, read back from storage, so a prompt's own hidden states already
see the quantized keys and values (what a whole-window simulation computes); with `prefill="exact"` the
history read back from storage followed by the chunk's own keys and values as they arrived (full
precision), as serving engines attend a prefill chunk. Either way the chunk is stored the same way, and
decode steps read the storage.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers.cache_utils import Cache

from kvpack.cache.io import load_cache, save_cache
from kvpack.cache.layer import CompressedLayer
from kvpack.codecs import CodebookCodec, NormalFloatCodec, UniformCodec
from kvpack.errors import MethodError, RecipeError, UnsupportedArchitectureError
from kvpack.hf.attention import attention_layers, install
from kvpack.cache.positions import PositionLog
from kvpack.codecs.checks import check_storable
from kvpack.hf.rope import RopeSource, check_pre_rope_supported, invert_rope
from kvpack.cache.packed import attach
from kvpack.hf.models import check_architecture, layer_types_and_kwargs, text_config
from kvpack.recipes.io import check_identity
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.resolve import check_settings_fit_model
from kvpack.cache.memory import memory_report

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
PREFILL_MODES = ("stored", "exact")  # what a multi-token call attends: see CompressedCache.update


def _check_streamable(codec, what: str) -> None:
    """Per-channel statistics over *all* tokens (no token groups) cannot be computed while streaming."""
    if type(codec) in (UniformCodec, CodebookCodec, NormalFloatCodec) and codec.axis == "channel" and not codec.group_size:
        raise MethodError(
            f"{what}: '{codec.name}' takes per-channel statistics over the whole sequence, which a cache that appends "
            "tokens cannot compute. Give it token groups (e.g. ':g32', as KIVI does) or use per-token statistics."
        )


class CompressedCache(Cache):
    """A transformers Cache storing keys/values compressed by `recipe` (see module docstring)."""

    def __init__(self, model, recipe: Recipe, residual_length: int | None = None, block_tokens: int = 128,
                 packed_attention: bool | None = None, attention_backend: str | None = None,
                 prefill: str = "stored", decoded_chunk_tokens: int = 0):
        config = text_config(model.config)
        check_architecture(config)
        n_layers = config.num_hidden_layers
        if recipe.num_layers != n_layers:
            raise RecipeError(
                f"Recipe '{recipe.method}' has codecs for {recipe.num_layers} layers but the model has {n_layers}; "
                "build or calibrate the recipe for this model."
            )
        if recipe.model_identity:  # a calibrated recipe: refuse one for another model now, not in a codec later
            check_identity(recipe.model_identity, model, recipe.method)
        settings = recipe.settings
        check_settings_fit_model(settings, model)
        self.recipe = recipe
        self.model_ref = model
        self.pre_rope = bool(settings.pre_rope)
        self.sink_tokens = int(settings.sink_tokens)
        self.recent_tokens = int(settings.recent_tokens if residual_length is None else residual_length)
        if self.recent_tokens < 0:
            raise ValueError(f"residual_length must be >= 0, got {self.recent_tokens}")
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        self.prefill = prefill
        self.left_pad = 0
        layer_types, layer_kwargs = layer_types_and_kwargs(config)
        groups = []
        for i in range(n_layers):
            _check_streamable(recipe.key_codecs[i], f"layer {i} keys")
            _check_streamable(recipe.value_codecs[i], f"layer {i} values")
            groups += [max(recipe.key_codecs[i].token_group(), 1), max(recipe.value_codecs[i].token_group(), 1)]
        lcm = math.lcm(*groups)
        self.block_tokens = max(lcm, math.ceil(block_tokens / lcm) * lcm)
        layers = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                window = None
            elif kind in _SLIDING_TYPES:
                window = int(layer_kwargs[i]["sliding_window"])
            else:
                raise UnsupportedArchitectureError(
                    f"Layer {i} is of type '{kind}'; CompressedCache supports full and sliding-window attention layers."
                )
            layers.append(CompressedLayer(i, recipe.key_codecs[i], recipe.value_codecs[i], self.recent_tokens,
                                          self.block_tokens, window))
        super().__init__(layers=layers)
        attn = attention_layers(model)
        if self.pre_rope:
            check_pre_rope_supported(model, attn, config)
        self.log = PositionLog(RopeSource(model, attn, layer_types)) if self.pre_rope else None
        install(model)
        # Decode steps read the packed blocks directly (cache/packed.py); None = decode-then-attend.
        self.packed = attach(self, packed_attention, attention_backend, decoded_chunk_tokens)
        self._pending: dict[int, tuple] = {}

    # -- what the hooks report ---------------------------------------------------------------------
    @property
    def head_tokens(self) -> int:
        """fp16 tokens at the start of every row: the sink, after any left padding."""
        return self.sink_tokens + self.left_pad if self.sink_tokens else 0

    def _kvpack_receive_mask(self, mask) -> None:
        if self.get_seq_length() == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
            real = mask != 0
            first = torch.where(real.any(-1), real.int().argmax(-1), torch.zeros_like(real[:, 0], dtype=torch.long))
            self.left_pad = int(first.max())

    def _kvpack_forward_done(self) -> None:
        """The forward that used this cache ended: drop the cos/sin memo of its layers (rebuilt on demand)."""
        if self.log is not None:
            self.log.memo.clear()

    def _kvpack_receive_rope(self, layer_idx: int, rope, position_ids) -> None:
        if self.pre_rope:
            self._pending[layer_idx] = (rope, position_ids)

    def take_rope(self, layer_idx: int, key_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's (cos, sin) [batch, q, rot] and positions [batch, q] for `layer_idx`."""
        batch, _, q, _ = key_states.shape
        got = self._pending.pop(layer_idx, None)
        if got is None or got[0] is None:
            raise UnsupportedArchitectureError(
                f"Layer {layer_idx}: no rotary cos/sin reached the cache. A pre-RoPE CompressedCache must be used through "
                "the model it was built for (its attention modules receive `position_embeddings`), e.g. "
                "model(ids, cache=cache) or model.generate(..., cache=cache) (`past_key_values=` before transformers 5.24)."
            )
        (cos, sin), position_ids = got
        if cos.shape[-2] != q:
            raise UnsupportedArchitectureError(f"Layer {layer_idx}: cos/sin cover {cos.shape[-2]} tokens but {q} keys arrived.")
        if position_ids is None:
            start = self.layers[layer_idx].get_seq_length()
            position_ids = torch.arange(start, start + q, device=key_states.device).unsqueeze(0)
        if position_ids.dim() != 2:
            raise UnsupportedArchitectureError(
                f"Layer {layer_idx}: position ids of shape {tuple(position_ids.shape)} (multimodal RoPE) are not supported."
            )
        self.log.dtype = cos.dtype
        return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), position_ids.expand(batch, -1)

    # -- the Cache contract ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values [B, H, q, D] (post-RoPE, as transformers hands them) and return what
        attention reads: every stored token, or zero-memory placeholders when packed attention reads the blocks
        (prefill="exact": a multi-token call gets the stored history and its own keys/values unquantized)."""
        layer = self.layers[layer_idx]
        check_storable(key_states, f"layer {layer_idx} keys")
        check_storable(value_states, f"layer {layer_idx} values")
        keys = key_states.float()
        if self.pre_rope:
            cos, sin, positions = self.take_rope(layer_idx, key_states)
            self.log.append(layer.get_seq_length(), positions)
            self.log.source.verify(layer_idx, positions, cos, sin, key_states)
            keys = invert_rope(keys, cos.float(), sin.float())
        if self.prefill == "exact" and key_states.shape[-2] > 1:
            return self._exact_chunk(layer, keys, key_states, value_states)
        layer.append(keys, value_states.float(), self.head_tokens, key_states.dtype)
        if self.packed is not None and self.packed.claim(layer_idx, key_states.shape[-2]):
            return self.packed.placeholders(layer, key_states)
        out = layer.read_all(self.rope_for(layer_idx, layer.first_slot, layer.get_seq_length()) if self.pre_rope else None)
        layer.free_outside_window(self.head_tokens)
        return out

    def _exact_chunk(self, layer: CompressedLayer, keys: torch.Tensor, key_states: torch.Tensor,
                     value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prefill="exact": store a multi-token chunk, but let it attend the history read back from storage followed
        by its own keys and values as they arrived (full precision), as serving engines attend a prefill chunk."""
        prior = None
        if layer.is_initialized and layer.k.stored:
            rope = self.rope_for(layer.layer_idx, layer.first_slot, layer.get_seq_length()) if self.pre_rope else None
            prior = layer.read_all(rope)
        layer.append(keys, value_states.float(), self.head_tokens, key_states.dtype)
        layer.free_outside_window(self.head_tokens)
        if prior is None:
            return key_states, value_states
        return (torch.cat([prior[0], key_states.to(prior[0].dtype)], dim=-2),
                torch.cat([prior[1], value_states.to(prior[1].dtype)], dim=-2))

    @property
    def positions(self) -> torch.Tensor | None:
        """Positions of every token seen, [batch, tokens] int32 (pre-RoPE caches; None otherwise)."""
        return None if self.log is None else self.log.positions

    def log_positions(self, slot: int, positions: torch.Tensor) -> None:
        """Record positions [batch, q] of tokens slot..slot+q-1 (restoring a saved cache)."""
        self.log.append(slot, positions)

    def rope_for(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [batch, end-start, rot] at the logged positions of tokens start..end-1."""
        return self.log.rope(layer_idx, start, end)

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        if self.log is not None:
            self.log.truncate(max((layer.get_seq_length() for layer in self.layers), default=0))

    def reset(self) -> None:
        super().reset()
        self._pending.clear()
        if self.log is not None:
            self.log.reset()
        self.left_pad = 0

    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            layer.map_batch(fn)
        if self.log is not None:
            self.log.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # -- reporting and persistence ----------------------------------------------------------------
    def memory_report(self):
        """Bytes held, by part, per token per layer, next to an fp16 DynamicCache (see cache_memory)."""

        return memory_report(self)

    def save(self, path: str | Path) -> Path:
        """Write this cache to `path` (safetensors, versioned, checksummed, atomic)."""
        return save_cache(self, path)

    @classmethod
    def load(cls, path: str | Path, model, recipe: Recipe) -> "CompressedCache":
        """Rebuild a cache saved with `save` for the same model and recipe; CacheFileError otherwise."""
        return load_cache(path, model, recipe, cls)
