"""The backend's CUDA path: new tokens are encoded into their slots by the slot codec's torch code running on the
device (`write.write_tokens` over a device twin of the engine layout), and attention reads the packed pages with
the Triton kernels of `triton_pages` (no decoded copy, no host round trip).

`DeviceLayout` is built once per engine layout and device: the layout with every codec, slot table and RoPE table
on the device (for the write path), and per layer the tables the kernels read. Per step, `metadata_fields` gives
the metadata builder device tensors only (query starts, lengths, positions), with the host-side bounds vLLM
already holds (longest query, longest context) for the launch shapes, so nothing here waits for the device.
The write path still synchronises where its torch code counts or selects data-dependent sets (outlier counts,
pool ranks, sink tokens); attention does not. Nothing here imports vLLM.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from kvpack.integrations.vllm.layout import EngineLayout
from kvpack.integrations.vllm.pages import PagePool
from kvpack.integrations.vllm.slots import LayerSlots, SlotPart
from kvpack.integrations.vllm.triton_pages import LayerTables, attend_pages, layer_tables
from kvpack.integrations.vllm.write import write_tokens


@dataclass
class DeviceLayout:
    """An engine layout's twin on one device (codecs, slot tables, RoPE) and the kernels' per-layer tables."""

    layout: EngineLayout
    tables: list[LayerTables]
    cos: torch.Tensor | None  # fp32 [max_len, D] (pre-RoPE pages)
    sin: torch.Tensor | None


def _part_on(part: SlotPart, device: torch.device) -> SlotPart:
    if part.kind == "raw":
        return part
    return replace(part, codec=part.codec.to(device), widths=part.widths.to(device))  # tables rebuilt on the device


_TWINS: dict[tuple[int, str], DeviceLayout] = {}


def device_layout(layout: EngineLayout, device: torch.device) -> DeviceLayout:
    """The twin of `layout` on `device`, built once (and forgotten when another layout asks)."""
    key = (id(layout), str(device))
    twin = _TWINS.get(key)
    if twin is None or twin.layout.config is not layout.config:
        _TWINS.clear()
        done: dict[int, tuple[LayerSlots, LayerTables]] = {}  # layers repeated by identity (fp16) are built once
        for layer in layout.layers:
            if id(layer) not in done:
                moved = LayerSlots(_part_on(layer.key, device), _part_on(layer.value, device), layer.sink_tokens,
                                   layer.sink_dtype, layer.key_pool)
                done[id(layer)] = moved, layer_tables(layer, device)
        layers = [done[id(layer)][0] for layer in layout.layers]
        tables = [done[id(layer)][1] for layer in layout.layers]
        rope = cos = sin = None
        if layout.rope is not None:
            rope = copy.copy(layout.rope)
            rope.cos, rope.sin = layout.rope.cos.to(device), layout.rope.sin.to(device)
            cos, sin = rope.cos.contiguous(), rope.sin.contiguous()
        twin = _TWINS[key] = DeviceLayout(replace(layout, layers=layers, rope=rope), tables, cos, sin)
    return twin


def metadata_fields(cm) -> dict:
    """KvpackMetadata's fields for a CUDA step from vLLM's CommonAttentionMetadata: query starts, lengths and the
    positions of the new tokens on the device (positions from the host query starts' sizes, no device sync), plus
    the host bounds of the launch."""
    qsl = cm.query_start_loc.to(torch.int32)
    seq_lens = cm.seq_lens.to(torch.int32)
    total = int(cm.query_start_loc_cpu[-1])  # host copy vLLM keeps
    q_lens = qsl[1:] - qsl[:-1]
    requests = seq_lens.shape[0]
    req = torch.repeat_interleave(torch.arange(requests, device=qsl.device), q_lens, output_size=total)
    within = torch.arange(total, device=qsl.device) - qsl[:-1].long()[req]
    positions = torch.zeros(max(cm.num_actual_tokens, total), dtype=torch.int64, device=qsl.device)
    positions[:total] = (seq_lens - q_lens).long()[req] + within  # padding tokens: 0
    return dict(num_actual_tokens=cm.num_actual_tokens, query_start_loc=qsl, seq_lens=seq_lens,
                block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping, positions=positions,
                max_query_len=int(cm.max_query_len), max_seq_len=int(cm.max_seq_len))


def step_bounds(metadata) -> tuple[int, int]:
    """(longest query, longest context) of a step: the builder's host ints, else read from the metadata's tensors
    (host tensors in tests; a device sync otherwise)."""
    max_q, max_s = getattr(metadata, "max_query_len", 0), getattr(metadata, "max_seq_len", 0)
    if not max_q or not max_s:
        qsl = metadata.query_start_loc
        max_q, max_s = int((qsl[1:] - qsl[:-1]).max()), int(metadata.seq_lens.max())
    return max_q, max_s


def attend(twin: DeviceLayout, pool: PagePool, layer: int, query: torch.Tensor, metadata, scale: float,
           output: torch.Tensor, splits: int | None = None, precision: str = "ieee") -> None:
    """output [T, Hq, D] <- attention of query [T, Hq, D] over each request's pages, as `read.attend` (causal,
    bottom-right aligned), with the Triton page kernels on query's device."""
    dev = query.device
    requests = metadata.seq_lens.shape[0]
    max_q, max_s = step_bounds(metadata)
    attend_pages(query, output, pool.slots[layer], pool.sinks[layer], pool.pools[layer],
                 metadata.block_table[:requests].to(dev), metadata.query_start_loc.to(dev, torch.int32),
                 metadata.seq_lens.to(dev, torch.int32), twin.tables[layer], scale, pool.block_size, max_q, max_s,
                 twin.cos, twin.sin, splits=splits, precision=precision)


def forward(layout: EngineLayout, pool: PagePool, layer: int, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, metadata, scale: float, output: torch.Tensor) -> None:
    """One layer's step on the device: write the new tokens (torch, on the device), then attend (Triton)."""
    twin = device_layout(layout, query.device)
    n = query.shape[0]
    write_tokens(twin.layout, pool, layer, key, value, metadata.slot_mapping[:n],
                 metadata.positions[:n].to(query.device, non_blocking=True))
    attend(twin, pool, layer, query, metadata, scale, output)
