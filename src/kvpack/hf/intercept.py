"""Intercept every attention layer's keys and values on their way into attention.

kvpack registers its own entry in transformers' attention-function registry. While a
`KVTransform` is installed with `intercept_kv(model, transform)`, each layer's keys/values
([batch, kv_heads, tokens, head_dim], before GQA repetition) pass through the transform, pre-RoPE
(rotated back exactly with the layer's own cos/sin, then forward again) or post-RoPE, and
then reach the model's own attention implementation. One code path for every RoPE model.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch
from torch import nn

from kvpack.errors import UnsupportedArchitectureError
from kvpack.hf.models import check_architecture, text_config
from kvpack.hf.rope import apply_rope, invert_rope, rotate_half

ATTN_NAME_SDPA = "kvpack_sdpa"
ATTN_NAME_EAGER = "kvpack_eager"
_ROPE_ATTR = "_kvpack_rope"
_INNER_ATTR = "_kvpack_inner"
_TRANSFORM_ATTR = "_kvpack_transform"


class KVTransform(Protocol):
    """Maps one layer's (keys, values) [batch, kv_heads, tokens, head_dim] to new ones of the same shape."""

    pre_rope: bool

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (modules with `layer_idx` and `k_proj`)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not layers:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no attention modules with 'k_proj' and 'layer_idx'; kvpack supports "
            "transformers decoder models such as Llama, Mistral, Qwen2/3 and Gemma2/3."
        )
    return sorted(layers, key=lambda m: m.layer_idx)


def _kvpack_attention(module, query, key, value, attention_mask, **kwargs):
    transform = getattr(module, _TRANSFORM_ATTR, None)
    if transform is not None:
        if transform.pre_rope:
            cos, sin = getattr(module, _ROPE_ATTR)
            # Only the newest tokens carry this step's cos/sin; the simulation path sees whole windows.
            if cos.shape[-2] != key.shape[-2]:
                raise RuntimeError("pre-RoPE interception needs keys of exactly this step's positions (no cache).")
            key_pre = invert_rope(key, cos, sin)
            key_pre, value = transform(module.layer_idx, key_pre, value)
            key = apply_rope(key_pre, cos, sin)
        else:
            key, value = transform(module.layer_idx, key, value)
    return getattr(module, _INNER_ATTR)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, mask in ((ATTN_NAME_SDPA, sdpa_mask), (ATTN_NAME_EAGER, eager_mask)):
        if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
            ALL_ATTENTION_FUNCTIONS.register(name, _kvpack_attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


def _inner_function(module: nn.Module, implementation: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UnsupportedArchitectureError(f"{type(module).__name__} has no eager attention function to wrap.")
        return eager
    if implementation not in ("sdpa",):
        raise UnsupportedArchitectureError(
            f"Attention implementation '{implementation}' is not supported for interception; load the model with "
            "attn_implementation='sdpa' or 'eager'."
        )
    return ALL_ATTENTION_FUNCTIONS[implementation]


def check_rope_convention(module: nn.Module) -> None:
    """Raise UnsupportedArchitectureError unless `module`'s model rotates keys in the rotate_half
    convention (channel c paired with c + d/2), the only one pre-RoPE keys are recovered in exactly.
    Interleaved (Cohere, GLM, ...) or half-width cos/sin (GPT-OSS) variants would silently hand the
    codec wrong "pre-RoPE" keys."""
    rotate = getattr(sys.modules[type(module).__module__], "rotate_half", None)
    probe = torch.arange(1.0, 9.0)
    if rotate is None or not torch.equal(rotate(probe), rotate_half(probe)):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} does not use the rotate_half RoPE convention (channel c paired with c + d/2), so "
            "its pre-RoPE keys cannot be recovered exactly; use a post-RoPE method (drop :pre-rope) with this model."
        )


def _stash_rope(module, args, kwargs):
    pos = kwargs.get("position_embeddings")
    if pos is None and len(args) > 1:
        pos = args[1]
    if pos is None:
        raise UnsupportedArchitectureError(f"{type(module).__name__} received no position_embeddings (cos, sin); it is not a RoPE attention.")
    setattr(module, _ROPE_ATTR, pos)


def _configs(model: nn.Module) -> list:
    config = model.config
    found = [config]
    sub = text_config(config)
    if sub is not config:
        found.append(sub)
    return found


@contextmanager
def intercept_kv(model: nn.Module, transform: KVTransform) -> Iterator[None]:
    """Route every attention layer's keys/values through `transform` inside the block."""
    check_architecture(model.config)
    _register()
    configs = _configs(model)
    original = configs[-1]._attn_implementation or "sdpa"
    name = ATTN_NAME_EAGER if original == "eager" else ATTN_NAME_SDPA
    layers = attention_layers(model)
    if transform.pre_rope:
        for layer in layers:
            check_rope_convention(layer)
    handles = []
    try:
        for layer in layers:
            setattr(layer, _INNER_ATTR, _inner_function(layer, original))
            setattr(layer, _TRANSFORM_ATTR, transform)
            handles.append(layer.register_forward_pre_hook(_stash_rope, with_kwargs=True))
        for cfg in configs:
            cfg._attn_implementation = name
        yield
    finally:
        for cfg in configs:
            cfg._attn_implementation = original
        for handle in handles:
            handle.remove()
        for layer in layers:
            for attr in (_INNER_ATTR, _TRANSFORM_ATTR, _ROPE_ATTR):
                if hasattr(layer, attr):
                    delattr(layer, attr)
