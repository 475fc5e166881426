"""The `kvpack` entry of vLLM's `additional_config`, and the checks that a vLLM engine can hold kvpack pages.

Users write `LLM(model=..., additional_config={"kvpack": {"method": "kvpack-3bit"}})` (or `{"recipe": DIR}`),
or `vllm serve PATH --additional-config '{"kvpack": {...}}'`. Everything here raises `KvpackVllmError` with a
message naming the problem and the fix; nothing falls back to vLLM's own cache silently.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from kvpack.errors import KVPackError

CONFIG_KEY = "kvpack"
LOSSLESS = "fp16"  # K/V kept in the model's dtype, one slot per token: the plug-in's lossless check
KNOWN_KEYS = ("method", "recipe", "key_outliers", "key_outlier_slots")
KEY_OUTLIERS = ("page", "token")  # a per-page pool shared by the page's tokens, or fixed slots per token
DEFAULT_KEY_OUTLIER_SLOTS = {"page": 4, "token": 4}  # per token: pool entries on average (4 B) / slots (3 B)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Models whose vLLM implementation rotates keys with the "neox" (rotate_half) convention, which a pre-RoPE
# recipe inverts exactly; others need a post-RoPE recipe.
NEOX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class KvpackVllmError(KVPackError, ValueError):
    """kvpack cannot serve this vLLM engine as configured (the message says why and what to do)."""


@dataclass(frozen=True)
class KvpackVllmConfig:
    """The parsed `additional_config["kvpack"]`: a method name or a recipe folder, and the key outlier slots."""

    method: str | None = None
    recipe: str | None = None
    key_outliers: str = "page"
    key_outlier_slots: int | None = None  # per token (page: pool entries on average); None: DEFAULT_KEY_OUTLIER_SLOTS

    @property
    def lossless(self) -> bool:
        return self.method == LOSSLESS


def kvpack_entry(additional_config: Any) -> dict | None:
    """The raw `kvpack` entry of vLLM's `additional_config`, or None when kvpack is not asked for."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    return additional_config[CONFIG_KEY]


def parse_entry(entry: Any) -> KvpackVllmConfig:
    """Check and parse the `kvpack` entry: {"method": NAME} or {"recipe": DIR}, optionally "key_outlier_slots"."""
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict):
        raise KvpackVllmError(f'additional_config["kvpack"] must be a dict such as {{"method": "kvpack-3bit"}}, got {entry!r}.')
    unknown = sorted(set(entry) - set(KNOWN_KEYS))
    if unknown:
        raise KvpackVllmError(f'Unknown key(s) {unknown} in additional_config["kvpack"]; known keys: {", ".join(KNOWN_KEYS)}.')
    method, recipe = entry.get("method"), entry.get("recipe")
    if (method is None) == (recipe is None):
        raise KvpackVllmError('additional_config["kvpack"] needs exactly one of "method" (e.g. "kvpack-3bit", "fp16") '
                              'or "recipe" (a folder written by `kvpack calibrate --out DIR`).')
    slots = entry.get("key_outlier_slots")
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or not 0 <= slots <= 64):
        raise KvpackVllmError(f'"key_outlier_slots" must be an integer in 0..64, got {slots!r}.')
    key_outliers = entry.get("key_outliers", "page")
    if key_outliers not in KEY_OUTLIERS:
        raise KvpackVllmError(f'"key_outliers" must be one of {KEY_OUTLIERS}, got {key_outliers!r}.')
    if method is not None and not isinstance(method, str):
        raise KvpackVllmError(f'"method" must be a method name string, got {method!r}.')
    return KvpackVllmConfig(method=method.strip() if method else None, recipe=str(recipe) if recipe else None,
                            key_outliers=key_outliers, key_outlier_slots=slots)


def check_platform(platform, vllm_config=None) -> None:
    """kvpack pages run on vLLM's CPU platform (torch) and on CUDA (Triton kernels, page size a multiple of 16
    tokens); ROCm, XPU, TPU and others are refused."""
    if platform.is_cpu():
        return
    if not platform.is_cuda():
        raise KvpackVllmError(f"kvpack's vLLM pages run on vLLM's CPU and CUDA platforms; this engine runs on "
                              f"'{platform.device_name}' ({type(platform).__name__}), which they do not support "
                              "(ROCm, XPU and TPU are not implemented): remove the kvpack entry to use vLLM's own "
                              "cache there.")
    if importlib.util.find_spec("triton") is None:
        raise KvpackVllmError("kvpack's CUDA pages are read by Triton kernels; install triton (vLLM's CUDA wheels "
                              "bring it) or remove the kvpack entry.")
    cache = getattr(vllm_config, "cache_config", None)
    block_size = getattr(cache, "block_size", None)
    if block_size and block_size % 16:
        raise KvpackVllmError(f"kvpack's CUDA kernels read pages in tiles of 16 tokens; block_size={block_size} is "
                              "not a multiple of 16. Set block_size to 16, 32, 64 or 128.")


def check_engine(vllm_config) -> None:
    """Raise KvpackVllmError unless this engine's model and options fit kvpack pages (decoder-only full attention,
    no MLA, no sliding window, no hybrid layers, one worker, vLLM's default cache dtype, a supported dtype)."""
    from vllm.platforms import current_platform

    check_platform(current_platform, vllm_config)
    model_config = vllm_config.model_config
    if model_config is None:
        raise KvpackVllmError("kvpack needs a model config; start vLLM with a model.")
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    name = getattr(hf, "model_type", "?")
    if getattr(model_config, "use_mla", False):
        raise KvpackVllmError(f"Model type '{name}' uses multi-head latent attention (MLA); kvpack pages hold per-head "
                              "keys and values. Remove the kvpack entry to serve this model with vLLM's own cache.")
    if getattr(model_config, "is_hybrid", False) or getattr(model_config, "is_attention_free", False):
        raise KvpackVllmError(f"Model type '{name}' mixes attention with other layers (hybrid/state-space); kvpack pages "
                              "support decoder models with full attention only. Remove the kvpack entry for this model.")
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None) or []
    uses_window = any("sliding" in str(t) for t in layer_types) if layer_types else window is not None
    if uses_window and getattr(hf, "use_sliding_window", True):
        raise KvpackVllmError(f"Model type '{name}' has sliding-window attention layers; kvpack's vLLM pages support full "
                              "attention only. Use a full-attention model, or remove the kvpack entry.")
    if model_config.dtype not in DTYPES:
        raise KvpackVllmError(f"kvpack pages support model dtypes {[str(d) for d in DTYPES]}, not {model_config.dtype}.")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        raise KvpackVllmError(f"kv_cache_dtype='{cache_dtype}' asks vLLM for its own quantized cache, while "
                              'additional_config["kvpack"] replaces the cache with kvpack pages: use one or the other.')
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise KvpackVllmError("kvpack pages are implemented for one worker (tensor_parallel_size=1, "
                              "pipeline_parallel_size=1); a recipe spans all KV heads of every layer.")
    if vllm_config.speculative_config is not None:
        raise KvpackVllmError("kvpack pages do not support speculative decoding yet; drop the speculative config.")
