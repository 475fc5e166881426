"""Packed attention for a CompressedCache: which layers hand their attention to kvpack in this forward.

    cache = CompressedCache(model, recipe)                   # packed attention is on by default
    model.generate(ids, **cache_kwargs(cache), ...)          # decode steps read the packed blocks directly

kvpack's attention functions (hf/attention.py) ask this state per layer: when CompressedCache.update
claimed the layer (any call without autograd), update returned zero-memory NaN placeholders instead of
the decoded history, and `attend` computes attention from the stored parts: calls of at most
`max_queries` query tokens (decode steps) through the kernels (kernels.dispatch.layer_attention), longer
ones (prefill chunks, multi-token steps) window by window over the stored tokens, never decoding more
than `window_tokens` of them at a time (kernels.dispatch.blockwise_attention). A cache built with
`decoded_chunk_tokens=N` leaves multi-token calls over at most N stored tokens unclaimed: they decode the
history and run the model's own attention (more memory, much faster on the CPU, the same stored numbers). Calls with attention
arguments the kernels do not implement get the exact path instead (`decoded`). Exactness: both compute
the same numbers as decode-then-attend up to float summation order (tests compare them to ~1e-4).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter

import torch

from kvpack.kernels import cpu
from kvpack.kernels.dispatch import BACKENDS, DEFAULT_MAX_QUERIES, WINDOW_TOKENS, blockwise_attention, layer_attention
from kvpack.kernels.rope import RopeTable


class PackedAttention:
    """A CompressedCache's packed-attention state: which layers hand attention over this forward."""

    def __init__(self, cache, backend: str = "auto", max_queries: int = DEFAULT_MAX_QUERIES,
                 window_tokens: int = WINDOW_TOKENS, decoded_chunk_tokens: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.cache = cache
        self.backend = backend
        self.max_queries = max_queries  # more query tokens than this: blockwise_attention
        self.window_tokens = window_tokens
        # multi-token calls over at most this many stored tokens: decode them and run the model's own attention
        self.decoded_chunk_tokens = decoded_chunk_tokens
        self.rope = RopeTable(cache.log) if cache.pre_rope else None
        self.active = 0  # forwards in flight that route attention here
        self.pending: set[int] = set()
        self.calls = 0  # packed attention calls served (for tests and reports)
        self.blockwise_calls = 0  # of which by blockwise_attention
        self.paths: Counter = Counter()  # decode-step calls by the path that read them: "cpu", "triton", "torch", ...
        self._announced = False

    def claim(self, layer_idx: int, queries: int) -> bool:
        """Called by CompressedCache.update: True if attention for this call will read the packed storage."""
        if not self.active or torch.is_grad_enabled():
            return False
        if queries > self.max_queries and self.cache.layers[layer_idx].k.stored <= self.decoded_chunk_tokens:
            return False  # decode-then-attend: the same stored numbers, the model's (causal, fused) attention
        self.pending.add(layer_idx)
        return True

    @staticmethod
    def placeholders(layer, key_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-memory NaN stand-ins [B, H, stored, D] for the keys/values update would have decoded."""
        batch, heads, _, dim = key_states.shape
        nan = torch.full((), float("nan"), dtype=key_states.dtype, device=key_states.device)
        shape = (batch, heads, layer.k.stored, dim)
        return nan.expand(shape), nan.expand(shape)

    def decoded(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole stored keys and values, dequantized (the exact path, for calls this one does not
        cover): ([B, H, stored, D], same) in the model's dtype."""
        layer = self.cache.layers[module.layer_idx]
        rope = self.cache.rope_for(layer.layer_idx, layer.first_slot, layer.get_seq_length()) if self.cache.pre_rope else None
        out = layer.read_all(rope)
        layer.free_outside_window(self.cache.head_tokens)
        return out

    def attend(self, module, query, attention_mask, scaling, softcap) -> torch.Tensor:
        """Attention of query [B, Hq, Q, D] over the layer's stored tokens -> [B, Q, Hq, D]."""
        layer = self.cache.layers[module.layer_idx]
        if query.shape[-2] <= self.max_queries:
            used: list = []
            out = layer_attention(layer, query, attention_mask, scaling=scaling, softcap=softcap, backend=self.backend,
                                  rope=self.rope, paths=used)
            path = used[0][1] if used and used[0][0] == "layer" else "+".join(sorted({p for _, p in used})) or "fp16"
            self.paths[path] += 1
            if not self._announced:
                self._announce(path, query.device)
        else:
            out = blockwise_attention(layer, query, attention_mask, scaling=scaling, softcap=softcap, rope=self.rope,
                                      window_tokens=self.window_tokens)
            self.blockwise_calls += 1
        layer.free_outside_window(self.cache.head_tokens)  # what the decode path does right after reading
        self.calls += 1
        return out

    def _announce(self, path: str, device: torch.device) -> None:
        """Say once per cache which path reads its decode steps, and why when it is the slow one."""
        self._announced = True
        if path == "torch" and device.type == "cpu":
            why = cpu.error() or "a part of the layer (codec, mask or RoPE variant) has no C++ kernel"
            warnings.warn(f"kvpack: decode attention uses the torch reference, not the C++ kernels ({why}); "
                          "`kvpack info` shows what the fast path needs.", RuntimeWarning, stacklevel=3)
        logging.getLogger("kvpack").info("kvpack cache: decode attention by the %s path (%s)", path,
                                         describe_path(path))

    def summary(self) -> str:
        """Decode-step attention calls by path, e.g. 'cpu: 300 calls (C++ kernels, AVX512)'."""
        if not self.paths:
            return "no decode-step attention calls yet"
        return "; ".join(f"{p}: {n} calls ({describe_path(p)})" for p, n in self.paths.most_common())


def describe_path(path: str) -> str:
    """A path name of PackedAttention.paths in words."""
    if path == "cpu":
        return f"C++ kernels, one call per layer, {cpu.instruction_set()}"
    if path == "triton":
        return "Triton split-K kernel per layer"
    if path == "fp16":
        return "fp16 sink/recent tokens only"
    return "per run: " + path.replace("torch", "torch reference (decode a chunk, then attend)")


def attach(cache, enabled: bool | None = None, backend: str | None = None,
           decoded_chunk_tokens: int = 0) -> PackedAttention | None:
    """Packed attention for `cache` (kvpack.hf.attention routes the model's attention to it); None when disabled.

    enabled=None reads KVPACK_PACKED_ATTENTION (default on); backend=None reads KVPACK_ATTENTION_BACKEND
    (auto: C++ kernels on CPU, Triton on CUDA, the torch reference otherwise). Multi-token calls (prefill chunks)
    over at most `decoded_chunk_tokens` stored tokens decode the history and attend with the model's own kernel.
    """
    if enabled is None:
        enabled = os.environ.get("KVPACK_PACKED_ATTENTION", "1") != "0"
    if not enabled:
        return None
    return PackedAttention(cache, backend or os.environ.get("KVPACK_ATTENTION_BACKEND", "auto"),
                           decoded_chunk_tokens=decoded_chunk_tokens)
