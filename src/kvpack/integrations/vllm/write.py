"""Write path: encode the tokens vLLM hands the backend into their page slots (decode steps and prefill chunks).

Slots and key-outlier pools are written by one C++ call (`kernel.write`) when kvpack's kernels are available and
cover the layer's parts, else with torch (`SlotPart.encode`, `outlier_pool.write_pool`: the reference)."""
from __future__ import annotations

import torch

from kvpack.codecs.checks import check_storable
from kvpack.integrations.vllm import kernel
from kvpack.integrations.vllm.layout import EngineLayout
from kvpack.integrations.vllm.outlier_pool import write_pool
from kvpack.integrations.vllm.pages import PagePool


def write_tokens(layout: EngineLayout, pool: PagePool, layer: int, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor, positions: torch.Tensor, compiled: bool = True) -> int:
    """Store key/value [T, Hkv, D] (post-RoPE, model dtype) at `slot_mapping` [T] (-1: padding, skipped), tokens
    at `positions` [T]. Returns the key outliers clamped for lack of a slot. `compiled=False`: the torch reference.
    Quantized slots refuse NaN, inf and magnitudes beyond fp16's range (their ranges and outliers are fp16) with
    NonFiniteError / ActivationRangeError naming the layer (`codecs.checks.check_storable`), instead of encoding
    them as some level; raw (lossless) slots store what they are given, as vLLM's own cache does."""
    slots, pos = slot_mapping.to(torch.int64), positions
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots, pos = key[keep], value[keep], slots[keep], positions[keep]
    if slots.numel() == 0:
        return 0
    parts = layout.layers[layer]
    names = (f"layer {layer}'s keys written to kvpack's vLLM pages", f"layer {layer}'s values written to kvpack's vLLM pages")
    quantized = parts.key.kind != "raw" or parts.value.kind != "raw"  # raw slots hold what vLLM's own cache would
    overflow = kernel.write(layout, pool, layer, key, value, slots, pos, names if quantized else None) if compiled else None
    if overflow is None:
        if quantized:
            check_storable(key, names[0])
            check_storable(value, names[1])
        k_store = layout.rope.unrotate(key, pos) if layout.rope is not None else key
        k_rows, overflow = parts.key.encode(k_store)
        v_rows, _ = parts.value.encode(value)
        pool.slots[layer][slots] = torch.cat([k_rows, v_rows], 1)
        if parts.key_pool:
            overflow += write_pool(pool.pools[layer], parts.key_pool, pool.block_size, slots, parts.key, k_store,
                                   pos < parts.sink_tokens)
    if parts.sink_tokens:
        sink = pos < parts.sink_tokens
        if bool(sink.any()):
            _write_sinks(pool, layer, parts.sink_tokens, slots[sink], pos[sink], key[sink], value[sink], layout.dtype)
    return overflow


def _write_sinks(pool: PagePool, layer: int, sink_tokens: int, slots: torch.Tensor, pos: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Sink record of a page: [sink_tokens, 2 (K, V), Hkv * D] in the model's dtype, post-RoPE keys."""
    records = pool.sinks[layer].view(pool.blocks, sink_tokens, 2, -1)  # bytes
    for s, p, k, v in zip(slots.tolist(), pos.tolist(), key, value):
        block = s // pool.block_size
        row = torch.stack([k.reshape(-1), v.reshape(-1)]).to(dtype).contiguous().view(torch.uint8)
        records[block, p] = row
