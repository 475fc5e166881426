"""The page layout of one vLLM engine: per-layer slots built once from the recipe, and the page size vLLM plans with.

`EngineLayout` is what the backend asks: slot parts per layer (`slots.LayerSlots`), whether keys are stored
pre-RoPE (then a `RopeTable`), and `page_content_bytes(block_size)`, the per-token page bytes vLLM's planner
counts. Layers may differ in size (a recipe that allocates bits per layer); vLLM's spec is one size for all
layers, so it is told the mean and `pages.PagePool` gives every layer its exact share of vLLM's one KV buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.codecs.nuq import NuqCodec
from kvpack.integrations.vllm.config import (DEFAULT_KEY_OUTLIER_SLOTS, KvpackVllmConfig, KvpackVllmError, check_engine,
                                             kvpack_entry, parse_entry)
from kvpack.integrations.vllm.recipe import load_recipe
from kvpack.integrations.vllm.rope import RopeTable
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, per_token_bytes, raw_part
from kvpack.recipes.recipe import Recipe


@dataclass
class EngineLayout:
    """Everything per model the pages need: config, recipe (None for fp16), per-layer slots, RoPE."""

    config: KvpackVllmConfig
    recipe: Recipe | None
    layers: list[LayerSlots]
    dtype: torch.dtype
    rope: RopeTable | None  # set when keys are stored pre-RoPE
    block_size: int

    @property
    def method(self) -> str:
        return self.recipe.method if self.recipe is not None else self.config.method

    @property
    def sink_tokens(self) -> int:
        return self.layers[0].sink_tokens

    def page_content_bytes(self, block_size: int | None = None) -> int:
        """Bytes per token and layer of a page, as vLLM's spec holds them (see `slots.per_token_bytes`)."""
        return per_token_bytes(self.layers, block_size or self.block_size, self.dtype.itemsize)

    def describe(self) -> dict:
        """A JSON-able summary (benchmarks and logs)."""
        n = self.block_size
        return {
            "method": self.method, "dtype": str(self.dtype).removeprefix("torch."), "block_size": n,
            "pre_rope": self.rope is not None, "sink_tokens": self.sink_tokens,
            "slot_bytes_per_layer": [layer.slot_bytes for layer in self.layers],
            "sink_bytes_per_layer": self.layers[0].sink_bytes,
            "key_outliers": self.config.key_outliers, "key_outlier_slots_per_token": self.layers[0].key.outlier_slots,
            "key_pool_entries_per_page": self.layers[0].key_pool, "value_outlier_slots": self.layers[0].value.outlier_slots,
            "page_content_bytes": self.page_content_bytes(),
            "model_dtype_bytes_per_token_layer": 2 * self.layers[0].key.channels * self.dtype.itemsize,
        }


def _hf_text_config(model_config):
    return getattr(model_config, "hf_text_config", None) or model_config.hf_config


def _nuq(codec, role: str, layer: int) -> NuqCodec:
    if not isinstance(codec, NuqCodec):
        raise KvpackVllmError(f"The recipe's {role} codec of layer {layer} is {type(codec).__name__}; kvpack's vLLM pages "
                              "hold NuqCodec (KVQuant-family) recipes and 'fp16' only. Use a kvquant-*/kvpack-* recipe.")
    return codec


def build_layout(vllm_config) -> EngineLayout:
    """The layout for an engine whose `additional_config` holds a kvpack entry (KvpackVllmError if it cannot)."""
    entry = kvpack_entry(vllm_config.additional_config)
    if entry is None:
        raise KvpackVllmError('kvpack\'s backend was selected without additional_config["kvpack"].')
    config = parse_entry(entry)
    check_engine(vllm_config)
    model_config = vllm_config.model_config
    recipe = load_recipe(config, model_config.hf_config, model_config.model)
    return layout_for(config, recipe, _hf_text_config(model_config),
                      model_config.get_num_kv_heads(vllm_config.parallel_config), model_config.get_head_size(),
                      model_config.dtype, vllm_config.cache_config.block_size, model_config.max_model_len)


def layout_for(config: KvpackVllmConfig, recipe: Recipe | None, hf, heads: int, dim: int, dtype: torch.dtype,
               block_size: int, max_model_len: int) -> EngineLayout:
    """The layout of `recipe` (None: the lossless fp16 slots) for a model of text config `hf` with `heads` KV heads of
    `dim` channels in `dtype`, pages of `block_size` tokens, positions below `max_model_len`."""
    if recipe is None:
        layers = [LayerSlots(raw_part(heads, dim, dtype), raw_part(heads, dim, dtype), 0, dtype)] * hf.num_hidden_layers
        return EngineLayout(config, None, layers, dtype, None, block_size)
    settings = recipe.settings
    if settings.recent_tokens:
        raise KvpackVllmError(f"'{settings.name}' keeps a full-precision window of {settings.recent_tokens} recent tokens, "
                              f"which fixed page slots do not hold; drop ':recent{settings.recent_tokens}' from the method "
                              "(the recipe is the same: a recent window is a serving choice).")
    if settings.sink_tokens > block_size:
        raise KvpackVllmError(f"'{settings.name}' keeps {settings.sink_tokens} sink tokens, more than one page "
                              f"({block_size} tokens); raise block_size.")
    per_token = config.key_outlier_slots
    if per_token is None:
        per_token = DEFAULT_KEY_OUTLIER_SLOTS[config.key_outliers]
    layers = []
    for i, (kc, vc) in enumerate(zip(recipe.key_codecs, recipe.value_codecs)):
        kc = _nuq(kc, "key", i)
        pooled = config.key_outliers == "page" and kc.axis == "channel" and kc.outlier_frac > 0
        key = nuq_part(kc, 0 if pooled else per_token)
        value = nuq_part(_nuq(vc, "value", i), None)
        if key.heads != heads or key.head_dim != dim:
            raise KvpackVllmError(f"The recipe is for {key.heads} KV heads of {key.head_dim} channels; this engine has "
                                  f"{heads} x {dim}. Use a recipe calibrated for this model.")
        if pooled and (block_size > 256 or key.channels > 256):
            raise KvpackVllmError(f"Per-page key-outlier pools index {block_size}-token pages and {key.channels} "
                                  'channels with one byte each (at most 256): lower block_size or set '
                                  '"key_outliers": "token".')
        layers.append(LayerSlots(key, value, settings.sink_tokens, dtype, per_token * block_size if pooled else 0))
    rope = RopeTable(hf, max_model_len, dtype) if settings.pre_rope else None
    return EngineLayout(config, recipe, layers, dtype, rope, block_size)


_ACTIVE: EngineLayout | None = None


def active_layout(vllm_config=None) -> EngineLayout:
    """The layout of this process's kvpack engine, built on first use (from `vllm_config`, else vLLM's current one)."""
    global _ACTIVE
    if _ACTIVE is None:
        if vllm_config is None:
            from vllm.config import get_current_vllm_config_or_none

            vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            raise KvpackVllmError("kvpack's vLLM backend needs the engine config; it is selected by the kvpack plug-in.")
        _ACTIVE = build_layout(vllm_config)
    return _ACTIVE


def reset_layout() -> None:
    """Forget the process's layout (a new engine in the same process builds its own)."""
    global _ACTIVE
    _ACTIVE = None
