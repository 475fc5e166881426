"""Key outliers in a per-page pool: the variable number of key outliers per token, held at a fixed page size.

Keys' outliers (elements beyond the calibrated per-channel range) vary per token, but their mean is stable; a
page of N tokens therefore holds one pool of P = `per_token * N` entries shared by its tokens, behind a uint16
count: entry = fp16 value, uint8 token offset in the page, uint8 channel (H * D < 256, N <= 256). Tokens are
appended in position order (a page's first token resets the count; vLLM writes a page's tokens in order and
never rewrites a slot of a live page); within a token the largest clamping errors go first, and what does not
fit is stored clamped to the range, as a per-token slot would. Sink positions are kept exactly elsewhere and
take no entries.
"""
from __future__ import annotations

import torch

from kvpack.integrations.vllm.slots import POOL_ENTRY as ENTRY
from kvpack.integrations.vllm.slots import POOL_HEADER as HEADER
from kvpack.integrations.vllm.slots import SlotPart


def find_outliers(part: SlotPart, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outliers of keys x [T, H, D] (pre-RoPE): (token index, channel, fp32 value) [K], ordered by token, then by
    clamping error (largest first)."""
    xh = x.float().transpose(0, 1)
    u, mask, _, scale = part.codec.normalize(xh)
    if mask is None:
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        return empty, empty, torch.zeros(0, device=x.device)
    T = x.shape[0]
    m = mask.transpose(0, 1).reshape(T, -1)
    err = ((u.abs() - 1).clamp(min=0) * scale.abs()).transpose(0, 1).reshape(T, -1)
    token, channel = m.nonzero(as_tuple=True)
    by_err = torch.argsort(-err[token, channel], stable=True)
    token, channel = token[by_err], channel[by_err]
    by_token = torch.argsort(token, stable=True)  # token order, largest error first within a token
    token, channel = token[by_token], channel[by_token]
    return token, channel, x.float().reshape(T, -1)[token, channel]


def write_pool(pool: torch.Tensor, entries: int, block_size: int, slots: torch.Tensor, part: SlotPart,
               x: torch.Tensor, skip: torch.Tensor) -> int:
    """Append the key outliers of tokens x [T, H, D] at `slots` [T] to their pages' pools (uint8 rows
    [blocks, pool_bytes]); `skip` [T] marks tokens that take no entries (sinks). Returns the outliers clamped."""
    if entries == 0:
        return 0
    token, channel, value = find_outliers(part, x)
    keep = ~skip[token]
    token, channel, value = token[keep], channel[keep], value[keep]
    page = slots // block_size
    offset = slots % block_size
    starts = page[offset == 0]
    if starts.numel():
        pool[starts, :HEADER] = 0  # a page's first token: a fresh pool
    if token.numel() == 0:
        return 0
    counts = pool[:, :HEADER].contiguous().view(torch.int16).to(torch.int64).squeeze(-1)  # [blocks]
    tok_page = page[token]
    # rank of each entry inside its page: stored count + entries before it in this step (token order kept)
    sorted_page, order = torch.sort(tok_page, stable=True)
    token, channel, value, tok_page = token[order], channel[order], value[order], sorted_page
    first = torch.ones_like(tok_page, dtype=torch.bool)
    first[1:] = tok_page[1:] != tok_page[:-1]
    steps = torch.arange(tok_page.numel(), device=tok_page.device)
    group_start = torch.cummax(torch.where(first, steps, 0), 0).values
    rank = counts[tok_page] + steps - group_start
    fits = rank < entries
    p, r = tok_page[fits], rank[fits]
    base = HEADER + ENTRY * r
    pool[p.unsqueeze(1), (base.unsqueeze(1) + torch.arange(2, device=base.device))] = value[fits].to(torch.float16).view(torch.uint8).view(-1, 2)
    pool[p, base + 2] = offset[token[fits]].to(torch.uint8)
    pool[p, base + 3] = channel[fits].to(torch.uint8)
    touched, added = torch.unique(tok_page, return_counts=True)
    new = (counts[touched] + added).clamp(max=entries).to(torch.int16)
    pool[touched, :HEADER] = new.view(torch.uint8).view(-1, 2)
    return int((~fits).sum())


def apply_pool(keys: torch.Tensor, pool: torch.Tensor, entries: int, block_size: int, blocks: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
    """Put the pooled outliers back into decoded keys [S, H, D] whose tokens sit at `blocks` / `pos` [S] (request
    after request, positions from 0)."""
    if entries == 0 or keys.shape[0] == 0:
        return keys
    first = pos % block_size == 0  # one row per (request, page): its first token
    rows = torch.nonzero(first).squeeze(1)  # index in keys of each page's first token
    data = pool[blocks[rows]]  # [pages, bytes]
    counts = data[:, :HEADER].contiguous().view(torch.int16).to(torch.int64).squeeze(-1)
    ent = data[:, HEADER:].view(-1, entries, ENTRY)
    valid = torch.arange(entries).unsqueeze(0) < counts.unsqueeze(1)  # [pages, entries]
    page_idx, slot = valid.nonzero(as_tuple=True)
    e = ent[page_idx, slot]  # [K, 4]
    value = e[:, :2].contiguous().view(torch.float16).float().squeeze(-1)
    row = rows[page_idx] + e[:, 2].to(torch.int64)
    page_len = torch.diff(rows, append=torch.tensor([keys.shape[0]]))  # tokens of each page in its request
    ok = e[:, 2].to(torch.int64) < page_len[page_idx]
    flat = keys.view(keys.shape[0], -1)
    flat[row[ok], e[ok, 3].to(torch.int64)] = value[ok]
    return keys
