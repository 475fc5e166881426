"""Read path: attention over each request's packed pages, found through vLLM's block table.

`attend` runs the compiled path (`kernel.attend`: one C++ call per layer and step that attends straight from the
page bytes) and falls back to `attend_torch` when kvpack's C++ kernels are unavailable (`kvpack.kernels.cpu.error()`).
`attend_torch`, the reference: every step gathers every request's slots, decodes them to float32
(`slots.SlotPart.decode`), re-applies RoPE for pre-RoPE pages, puts the exact sink tokens back, and runs torch
attention per request (causal within the new tokens). Nothing decoded is kept between steps: the pages are the cache.
"""
from __future__ import annotations

import torch

from kvpack.integrations.vllm import kernel
from kvpack.integrations.vllm.layout import EngineLayout
from kvpack.integrations.vllm.outlier_pool import apply_pool
from kvpack.integrations.vllm.pages import PagePool


def token_slots(seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """(slot id, position, block id) [sum(seq_lens)] of every cached token, request after request."""
    lens = seq_lens.to(torch.int64)
    req = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    blocks = block_table.to(torch.int64)[req, pos // block_size]
    return blocks * block_size + pos % block_size, pos, blocks


def gather_kv(layout: EngineLayout, pool: PagePool, layer: int, seq_lens: torch.Tensor,
              block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded post-RoPE keys and values [sum(seq_lens), Hkv, D] (float32) of every request, in order."""
    parts = layout.layers[layer]
    slot, pos, blocks = token_slots(seq_lens, block_table, pool.block_size)
    rows = pool.slots[layer][slot]
    kb = parts.key.nbytes
    keys, values = parts.key.decode(rows[:, :kb]), parts.value.decode(rows[:, kb:])
    if parts.key_pool:
        keys = apply_pool(keys, pool.pools[layer], parts.key_pool, pool.block_size, blocks, pos)
    if layout.rope is not None:
        keys = layout.rope.rotate(keys, pos)
    if parts.sink_tokens:
        sink = pos < parts.sink_tokens
        if bool(sink.any()):
            records = pool.sinks[layer].view(pool.blocks, parts.sink_tokens, 2, -1)
            exact = records[blocks[sink], pos[sink]].contiguous().view(layout.dtype).float()  # [S, 2, Hkv * D]
            keys[sink] = exact[:, 0].view(-1, parts.key.heads, parts.key.head_dim)
            values[sink] = exact[:, 1].view(-1, parts.value.heads, parts.value.head_dim)
    return keys, values


def attend(layout: EngineLayout, pool: PagePool, layer: int, query: torch.Tensor, metadata, scale: float,
           output: torch.Tensor) -> None:
    """output [T, Hq, D] <- attention of query [T, Hq, D] over each request's pages: the compiled path, else torch."""
    if not kernel.attend(layout, pool, layer, query, metadata, scale, output):
        attend_torch(layout, pool, layer, query, metadata, scale, output)


def attend_torch(layout: EngineLayout, pool: PagePool, layer: int, query: torch.Tensor, metadata, scale: float,
                 output: torch.Tensor) -> None:
    """output [T, Hq, D] <- attention of query [T, Hq, D] over each request's pages (causal, bottom-right aligned:
    query i of a request with q new tokens and L cached sits at position L - q + i)."""
    qsl, seq_lens = metadata.query_start_loc, metadata.seq_lens
    requests = seq_lens.numel()
    keys, values = gather_kv(layout, pool, layer, seq_lens, metadata.block_table[:requests])
    heads = keys.shape[1]
    keys, values = keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous()  # [Hkv, S, D]
    at = 0
    for r in range(requests):
        qs, qe, length = int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])
        q_len = qe - qs
        if q_len:
            group = query.shape[1] // heads
            # [Hkv, group * q, D]: the query heads sharing a KV head, token-major inside the group
            q = query[qs:qe].float().view(q_len, heads, group, -1).permute(1, 0, 2, 3).reshape(heads, q_len * group, -1)
            scores = torch.matmul(q, keys[:, at: at + length].transpose(1, 2)) * scale  # [Hkv, q * group, L]
            if q_len > 1:
                allowed = torch.arange(length).unsqueeze(0) <= (length - q_len + torch.arange(q_len)).unsqueeze(1)
                scores = scores.masked_fill(~allowed.repeat_interleave(group, 0), float("-inf"))
            out = torch.matmul(torch.softmax(scores, -1), values[:, at: at + length])  # [Hkv, q * group, D]
            output[qs:qe] = out.view(heads, q_len, group, -1).permute(1, 0, 2, 3).reshape(q_len, heads * group, -1).to(output.dtype)
        at += length
