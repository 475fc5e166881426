"""Where each layer's pages live inside vLLM's KV buffer.

vLLM allocates one buffer for all layers and gives each layer a view `[blocks, 1, block_size, C]` of C bytes per
token (C: the mean over layers, `EngineLayout.page_content_bytes`). Layers whose slots differ in size would not
fit one C, so `PagePool` lays the buffer out itself, layer after layer: layer l holds `blocks` pages of
`block_size * slot_bytes(l)` slot bytes followed by its sink records `blocks * sink_bytes(l)` and its key-outlier
pools `blocks * pool_bytes(l)`. Every layer is a
kvpack layer of the same model (the plug-in refuses hybrid models and draft models), so nothing else uses the
buffer, and block ids mean the same pages for every layer, as vLLM's prefix caching and preemption expect.
"""
from __future__ import annotations

import torch

from kvpack.integrations.vllm.config import KvpackVllmError
from kvpack.integrations.vllm.slots import LayerSlots


class PagePool:
    """Per-layer slot rows `[blocks * block_size, slot_bytes]`, sink rows `[blocks, sink_bytes]` and key-outlier pool
    rows `[blocks, pool_bytes]` (uint8 views)."""

    def __init__(self, kv_cache: torch.Tensor, layers: list[LayerSlots]):
        if kv_cache.dim() != 4 or kv_cache.shape[1] != 1:
            raise KvpackVllmError(f"Expected vLLM's kvpack page view [blocks, 1, block_size, C], got {tuple(kv_cache.shape)}.")
        self.blocks, self.block_size = kv_cache.shape[0], kv_cache.shape[2]
        buffer = torch.empty(0, dtype=torch.uint8, device=kv_cache.device).set_(kv_cache.untyped_storage())
        need = sum(self.blocks * layer.block_bytes(self.block_size) for layer in layers)
        if need > buffer.numel():
            raise KvpackVllmError(
                f"vLLM's KV buffer holds {buffer.numel()} bytes, the kvpack pages of {len(layers)} layers x {self.blocks} "
                f"blocks of {self.block_size} tokens need {need}: the kernel block size differs from the block size the "
                "page size was planned with. Set block_size explicitly (e.g. 128) or report this.")
        self.slots: list[torch.Tensor] = []
        self.sinks: list[torch.Tensor] = []
        self.pools: list[torch.Tensor] = []
        at = 0
        for layer in layers:
            n = self.blocks * self.block_size * layer.slot_bytes
            self.slots.append(buffer[at: at + n].view(self.blocks * self.block_size, layer.slot_bytes))
            at += n
            m = self.blocks * layer.sink_bytes
            self.sinks.append(buffer[at: at + m].view(self.blocks, layer.sink_bytes))
            at += m
            m = self.blocks * layer.pool_bytes
            self.pools.append(buffer[at: at + m].view(self.blocks, layer.pool_bytes))
            at += m
        self.used_bytes = at
        self.buffer_bytes = buffer.numel()


_POOLS: dict[tuple[int, int, int], PagePool] = {}


def pool_for(kv_cache: torch.Tensor, layers: list[LayerSlots]) -> PagePool:
    """The pool of the buffer behind `kv_cache` (built once per buffer)."""
    key = (kv_cache.untyped_storage().data_ptr(), kv_cache.shape[0], kv_cache.shape[2])
    pool = _POOLS.get(key)
    if pool is None:
        _POOLS.clear()  # a new buffer (new engine or re-allocation): forget the old one
        pool = _POOLS[key] = PagePool(kv_cache, layers)
    return pool
