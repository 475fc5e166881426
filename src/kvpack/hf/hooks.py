"""Model hooks that tell a CompressedCache what `Cache.update` does not: each attention layer's
cos/sin and position ids (needed to store keys pre-RoPE), and the batch's left padding (needed
to keep each row's first tokens, the attention sink, in full precision).

The hooks are installed once per model and act only when the cache passed to the
forward is a cache that has `_kvpack_receive_rope` / `_kvpack_receive_mask`; with any other cache
(or none) they do nothing.
"""
from __future__ import annotations

from torch import nn

_INSTALLED = "_kvpack_cache_hooks"


def _cache_argument() -> str:
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def cache_kwargs(cache) -> dict:
    """{name: cache} for model(...) / model.generate(...) in the installed transformers."""
    return {CACHE_ARGUMENT: cache}


def passed_cache(kwargs: dict):
    """The cache a forward call received: transformers >= 5.24 names it `cache`, earlier 5.x
    `past_key_values` (still accepted, deprecated, until 5.40)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _attention_pre_hook(module, args, kwargs):
    cache = passed_cache(kwargs)
    receive = getattr(cache, "_kvpack_receive_rope", None)
    if receive is None:
        return
    rope = kwargs.get("position_embeddings")
    if rope is None and len(args) > 1:
        rope = args[1]
    receive(module.layer_idx, rope, kwargs.get("position_ids"))


def _model_pre_hook(module, args, kwargs):
    cache = passed_cache(kwargs)
    receive = getattr(cache, "_kvpack_receive_mask", None)
    if receive is not None:
        receive(kwargs.get("attention_mask"))


def install(model: nn.Module, attention_layers: list[nn.Module]) -> None:
    """Install the hooks on `model` (idempotent)."""
    if getattr(model, _INSTALLED, None):
        return
    handles = [layer.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True) for layer in attention_layers]
    # The top-level model and its decoder both see the 2D attention mask; whichever runs first reports it.
    targets = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, nn.Module):
        targets.append(decoder)
    handles += [t.register_forward_pre_hook(_model_pre_hook, with_kwargs=True) for t in targets]
    object.__setattr__(model, _INSTALLED, handles)


def uninstall(model: nn.Module) -> None:
    """Remove the hooks `install` added."""
    for handle in getattr(model, _INSTALLED, None) or []:
        handle.remove()
    if hasattr(model, _INSTALLED):
        object.__delattr__(model, _INSTALLED)
