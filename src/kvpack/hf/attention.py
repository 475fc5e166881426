"""Every way kvpack reaches into a transformers forward, in one place.

One mechanism, installed once per model (`install`, idempotent):
- two attention functions in transformers' attention registry, `kvpack_sdpa` and `kvpack_eager`, wrapping
  the model's own sdpa / eager attention. Per call, in this order:
  1. a KVTransform installed by `intercept_kv` (simulation, calibration) replaces the layer's keys and
     values [batch, kv_heads, tokens, head_dim] before GQA repetition; pre-RoPE transforms see keys
     rotated back exactly with the layer's own cos/sin, and rotated forward again afterwards; a transform
     that names a recent window (`window_starts`) has each query read the keys and values of its own
     window as the cache keeps them (`kept`) and older ones transformed, as a cache serving token by token
     holds them;
  2. a cache whose packed-attention state claimed this layer (a CompressedCache's decode steps) computes
     attention from its stored blocks (`PackedState.attend`);
  3. otherwise the wrapped function runs unchanged;
- a forward pre-hook on every attention layer: hands its cos/sin and position ids to the cache passed to
  the forward (`_kvpack_receive_rope`) and keeps them for a transform;
- forward pre/post hooks on the model and its decoder: hand the 2-D attention mask to the cache
  (`_kvpack_receive_mask`, for left padding) and, while a transform or a packed cache is in use, switch
  `config._attn_implementation` to kvpack's twin of the model's implementation, restored afterwards; when
  the outermost forward ends, the cache is told (`_kvpack_forward_done`) so it frees per-forward buffers.
The hooks do nothing for forwards without a transform and without a kvpack cache.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpack.errors import UnsupportedArchitectureError
from kvpack.hf.models import check_architecture, text_config
from kvpack.hf.rope import apply_rope, check_rope_convention, invert_rope

NAMES = {"sdpa": "kvpack_sdpa", "eager": "kvpack_eager"}
# Attention keyword arguments packed attention implements (or that do not change the result); any other one
# sends the call to the model's own attention over the decoded keys and values.
PACKED_KWARGS = {"softcap", "sliding_window", "position_ids", "cache_position", "use_cache", "output_attentions",
                 "cache", "past_key_values", "position_embeddings"}
_INSTALLED = "_kvpack_hooks"
_ROPE = "_kvpack_rope"
_TRANSFORM = "_kvpack_transform"
_local = threading.local()

# transformers >= 5.24 names the forward's cache argument `cache`; earlier 5.x `past_key_values`.
CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


class KVTransform(Protocol):
    """Maps one layer's (keys, values) [batch, kv_heads, tokens, head_dim] to new ones of the same shape."""

    pre_rope: bool

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class WindowedTransform(KVTransform, Protocol):
    """A KVTransform whose cache would keep each query's most recent tokens as they came (a recent window)."""

    def window_starts(self, layer_idx: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per query i of a window of `tokens` [tokens] (int64), for keys and for values: the first token that a
        cache serving token by token still holds unchanged when query i attends (earlier tokens, past the sink,
        read transformed); None without a window."""
        ...

    def kept(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the cache holds its recent window (e.g. rounded to fp16), same shapes."""
        ...


class PackedState(Protocol):
    """What a cache with packed attention exposes (cache.packed.PackedAttention)."""

    active: int  # forwards in flight that route attention to it
    pending: set[int]  # layers whose attention it computes in this forward

    def attend(self, module: nn.Module, query: torch.Tensor, attention_mask, scaling: float | None,
               softcap: float | None) -> torch.Tensor: ...

    def decoded(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]: ...


def cache_kwargs(cache) -> dict:
    """{name: cache} for model(...) / model.generate(...) in the installed transformers."""
    return {CACHE_ARGUMENT: cache}


def passed_cache(kwargs: dict):
    """The cache a forward call received (`cache`, or the deprecated `past_key_values`)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (modules with `layer_idx` and `k_proj`)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not layers:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no attention modules with 'k_proj' and 'layer_idx'; kvpack supports "
            "transformers decoder models such as Llama, Mistral, Qwen2/3 and Gemma2/3."
        )
    return sorted(layers, key=lambda m: m.layer_idx)


# ------------------------------------------------------------------------------------ attention functions
def _wrapped(module: nn.Module, kind: str):
    if kind == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UnsupportedArchitectureError(f"{type(module).__name__} has no eager attention function to wrap.")
        return eager
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _frames() -> list:
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def _make_attention(kind: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        transform = getattr(module, _TRANSFORM, None)
        if transform is not None:
            starts = _window_starts(transform, module.layer_idx, query, key)
            (key, value), *kept = _transformed(module, transform, key, value, window=starts is not None)
            if kept:
                key, value, attention_mask = _served_window(kind, query, kept[0], (key, value), attention_mask, starts)
        frames = _frames()
        state = frames[-1][0] if frames and frames[-1] else None
        if state is not None and module.layer_idx in state.pending:
            state.pending.discard(module.layer_idx)
            unknown = [k for k, v in kwargs.items() if v is not None and v is not False and k not in PACKED_KWARGS]
            if unknown or (dropout and module.training):  # e.g. GPT-OSS's s_aux sinks: the exact path
                key, value = state.decoded(module)
            else:
                scaling = getattr(module, "scaling", None) if scaling is None else scaling
                return state.attend(module, query, attention_mask, scaling, kwargs.get("softcap")), None
        return _wrapped(module, kind)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    attention.__name__ = NAMES[kind]
    return attention


def _transformed(module, transform: KVTransform, key: torch.Tensor, value: torch.Tensor, window: bool = False) -> list:
    """[(keys, values) through the transform], and with `window` also (keys, values) as its cache keeps its recent
    window (`WindowedTransform.kept`); pre-RoPE transforms see the keys rotated back once for both."""
    steps = [transform, transform.kept] if window else [transform]
    if not transform.pre_rope:
        return [step(module.layer_idx, key, value) for step in steps]
    cos, sin = getattr(module, _ROPE)
    if cos.shape[-2] != key.shape[-2]:  # only this step's tokens carry this step's cos/sin
        raise RuntimeError("pre-RoPE interception needs keys of exactly this step's positions (no cache).")
    key_pre = invert_rope(key, cos, sin)
    return [(apply_rope(k, cos, sin), v) for k, v in (step(module.layer_idx, key_pre, value) for step in steps)]


def _window_starts(transform, layer_idx: int, query: torch.Tensor, key: torch.Tensor):
    """The transform's per-query window starts (keys, values), for a whole window attending to itself; else None."""
    starts = getattr(transform, "window_starts", None)
    if starts is None or query.shape[-2] != key.shape[-2]:
        return None
    return starts(layer_idx, key.shape[-2])


def _allowed(mask, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """The model's mask as booleans [B | 1, 1 | H, queries, keys] (True: may attend); None means causal."""
    if mask is None:
        return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)[None, None]
    mask = mask[..., :keys]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _served_window(kind: str, query: torch.Tensor, kept: tuple, transformed: tuple, mask, starts: tuple):
    """Keys and values [B, H, copies * T, D] and the mask over them with which query i attends every token j it
    may see exactly once: key j as the window keeps it when j >= the keys' start of query i, else transformed;
    value j likewise by the values' start (copies: 2 when keys and values share their starts, else 4)."""
    (key, value), (key_q, value_q) = kept, transformed
    tokens = key.shape[-2]
    pos = torch.arange(tokens, device=key.device)
    key_recent = pos[None, :] >= starts[0].to(key.device)[:, None]  # [T, T]: query i reads key j unchanged
    value_recent = pos[None, :] >= starts[1].to(key.device)[:, None]
    allowed = _allowed(mask, query.shape[-2], tokens, key.device)
    if torch.equal(key_recent, value_recent):
        keys, values = [key, key_q], [value, value_q]
        parts = [key_recent, ~key_recent]
    else:
        keys, values = [key, key, key_q, key_q], [value, value_q, value, value_q]
        parts = [key_recent & value_recent, key_recent & ~value_recent, ~key_recent & value_recent,
                 ~key_recent & ~value_recent]
    both = torch.cat([allowed & p for p in parts], dim=-1)
    if kind == "eager":
        both = torch.zeros(both.shape, dtype=query.dtype, device=query.device).masked_fill(~both, torch.finfo(query.dtype).min)
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), both


def _register() -> None:
    for kind, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        if NAMES[kind] not in ALL_ATTENTION_FUNCTIONS._global_mapping:
            ALL_ATTENTION_FUNCTIONS.register(NAMES[kind], _make_attention(kind))
            ALL_MASK_ATTENTION_FUNCTIONS.register(NAMES[kind], mask)


# ------------------------------------------------------------------------------------ hooks
def _configs(model: nn.Module) -> list:
    config = model.config
    sub = text_config(config)
    return [config] if sub is config else [config, sub]


def _kind(model: nn.Module) -> str:
    """'sdpa' or 'eager': the model's own attention implementation (whichever twin is active now)."""
    current = _configs(model)[-1]._attn_implementation or "sdpa"
    for kind, name in NAMES.items():
        if current in (kind, name):
            return kind
    raise UnsupportedArchitectureError(
        f"Attention implementation '{current}' is not supported by kvpack; load the model with "
        "attn_implementation='sdpa' or 'eager'."
    )


def _layer_pre_hook(module, args, kwargs):
    rope = kwargs.get("position_embeddings")
    if rope is None and len(args) > 1:
        rope = args[1]
    if getattr(module, _TRANSFORM, None) is not None:
        if rope is None:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} received no position_embeddings (cos, sin); it is not a RoPE attention.")
        setattr(module, _ROPE, rope)
    receive = getattr(passed_cache(kwargs), "_kvpack_receive_rope", None)
    if receive is not None:
        receive(module.layer_idx, rope, kwargs.get("position_ids"))


def _model_pre_hook(model, args, kwargs):
    cache = passed_cache(kwargs)
    receive = getattr(cache, "_kvpack_receive_mask", None)
    if receive is not None:
        receive(kwargs.get("attention_mask"))
    state = getattr(cache, "packed", None)
    intercepting = getattr(model, "_kvpack_intercepting", 0) > 0
    frame = None
    if state is not None or intercepting:
        switched = []
        name = NAMES[_kind(model)]
        for cfg in _configs(model):
            if cfg._attn_implementation != name:
                switched.append((cfg, cfg._attn_implementation))
                cfg._attn_implementation = name
        if state is not None:
            state.active += 1
        frame = (state, switched, cache)
    _frames().append(frame)


def _model_post_hook(model, args, kwargs, output):
    frames = _frames()
    frame = frames.pop() if frames else None
    if frame is None:
        return
    state, switched, cache = frame
    for cfg, name in switched:
        cfg._attn_implementation = name
    if state is None:
        return
    state.active -= 1
    done = getattr(cache, "_kvpack_forward_done", None)
    if done is not None and not state.active:
        done()
    if not state.active and state.pending:
        left = sorted(state.pending)
        state.pending.clear()
        raise RuntimeError(
            f"layers {left} handed attention to kvpack's packed path but their attention never ran through the "
            "transformers attention registry; build the cache with CompressedCache(..., packed_attention=False)."
        )


def install(model: nn.Module) -> None:
    """Register kvpack's attention functions and hook `model` (idempotent); see the module docstring."""
    check_architecture(model.config)
    _register()
    if getattr(model, _INSTALLED, None):
        return
    _kind(model)
    handles = [layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True) for layer in attention_layers(model)]
    targets = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, nn.Module):
        targets.append(decoder)
    for target in targets:
        handles.append(target.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        handles.append(target.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True))
    object.__setattr__(model, _INSTALLED, handles)


def uninstall(model: nn.Module) -> None:
    """Remove the hooks `install` added."""
    for handle in getattr(model, _INSTALLED, None) or []:
        handle.remove()
    if hasattr(model, _INSTALLED):
        object.__delattr__(model, _INSTALLED)


@contextmanager
def intercept_kv(model: nn.Module, transform: KVTransform) -> Iterator[None]:
    """Route every attention layer's keys/values through `transform` inside the block."""
    install(model)
    layers = attention_layers(model)
    if transform.pre_rope:
        for layer in layers:
            check_rope_convention(layer)
    try:
        for layer in layers:
            setattr(layer, _TRANSFORM, transform)
        object.__setattr__(model, "_kvpack_intercepting", getattr(model, "_kvpack_intercepting", 0) + 1)
        yield
    finally:
        object.__setattr__(model, "_kvpack_intercepting", getattr(model, "_kvpack_intercepting", 1) - 1)
        for layer in layers:
            for attr in (_TRANSFORM, _ROPE):
                if hasattr(layer, attr):
                    delattr(layer, attr)
