"""Encoded blocks of one layer's keys or values, appended and never re-encoded.

A block is what a codec's `encode` returned for x [*lead, tokens, head_dim] (lead = batch, heads).
Codecs follow one layout convention: every tensor of an `Encoded` starts with the leading dims
of x, the rest is the codec's own. Consecutive blocks with identical layouts (same tensor shapes
after the leading dims, same meta) are kept in one *run*: per tensor a preallocated buffer
[*lead, capacity, *rest] that new blocks are copied into (capacity grows by ~1/8, so appends are
amortized O(1)). A run decodes in one call, as an `Encoded` whose leading dims are
(*lead, blocks): the codec sees `blocks` as one more leading dim. The first time a codec's
blocks are stacked the cache checks that this equals decoding the blocks one by one; codecs
that break the convention (variable-length outlier lists, for instance) keep one run per block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codecs import Codec, Encoded

_VERDICT = "_kvpack_stacks_exactly"  # codec attribute caching the one-time stacking check


def _signature(enc: Encoded, lead: int) -> tuple | None:
    """Layout key of a block, or None if it breaks the leading-dims convention."""
    parts = []
    for name in sorted(enc.tensors):
        t = enc.tensors[name]
        if t.dim() < lead or tuple(t.shape[:lead]) != tuple(enc.shape[:lead]):
            return None
        parts.append((name, tuple(t.shape[lead:]), t.dtype))
    return (tuple(parts), tuple(enc.shape[lead:]), repr(sorted(enc.meta.items())))


@dataclass
class Run:
    """Blocks of identical layout: buffers [*lead, capacity, *rest], `count` blocks used."""

    buffers: dict[str, torch.Tensor]
    block_shape: tuple[int, ...]  # shape of one block's x: [*lead, tokens, head_dim]
    meta: dict
    count: int
    signature: tuple | None = field(default=None, compare=False)

    @property
    def lead(self) -> int:
        return len(self.block_shape) - 2

    @property
    def block_tokens(self) -> int:
        return self.block_shape[-2]

    @property
    def tokens(self) -> int:
        return self.count * self.block_tokens

    def used(self, name: str) -> torch.Tensor:
        return self.buffers[name].narrow(self.lead, 0, self.count)

    def encoded(self) -> Encoded:
        """All blocks as one Encoded of shape [*lead, count, block_tokens, head_dim]."""
        shape = (*self.block_shape[:-2], self.count, *self.block_shape[-2:])
        return Encoded({n: self.used(n) for n in self.buffers}, shape, dict(self.meta))

    def decode(self, codec: Codec) -> torch.Tensor:
        """-> float tensor [*lead, tokens, head_dim]."""
        x = codec.decode(self.encoded())
        return x.reshape(*self.block_shape[:-2], self.tokens, self.block_shape[-1])

    def append(self, enc: Encoded) -> None:
        lead = self.lead
        capacity = next(iter(self.buffers.values())).shape[lead]
        if self.count == capacity:
            grow = max(8, capacity // 8)
            for name, buf in self.buffers.items():
                extra = torch.zeros(*buf.shape[:lead], grow, *buf.shape[lead + 1:], dtype=buf.dtype, device=buf.device)
                self.buffers[name] = torch.cat([buf, extra], dim=lead)
        for name, t in enc.tensors.items():
            self.buffers[name].select(lead, self.count).copy_(t)
        self.count += 1

    def nbytes(self, name: str, reserved: bool = False) -> int:
        buf = self.buffers[name]
        per_block = buf.element_size() * buf.numel() // max(buf.shape[self.lead], 1)
        blocks = buf.shape[self.lead] - self.count if reserved else self.count
        return per_block * blocks

    def map_batch(self, fn) -> None:
        """Apply fn (a function of a tensor with batch first) to every buffer."""
        self.buffers = {n: fn(b) for n, b in self.buffers.items()}
        self.block_shape = (int(next(iter(self.buffers.values())).shape[0]), *self.block_shape[1:])

    def compact(self) -> None:
        """Drop unused capacity (before saving)."""
        self.buffers = {n: self.used(n).contiguous() for n in self.buffers}

    def drop_first(self, blocks: int) -> None:
        self.buffers = {n: b.narrow(self.lead, blocks, b.shape[self.lead] - blocks).clone() for n, b in self.buffers.items()}
        self.count -= blocks

    def drop_last(self, blocks: int) -> None:
        self.count -= blocks


def _new_run(enc: Encoded, signature: tuple | None) -> Run:
    lead = len(enc.shape) - 2
    buffers = {n: t.unsqueeze(lead).clone() for n, t in enc.tensors.items()}
    return Run(buffers, tuple(enc.shape), dict(enc.meta), 1, signature)


def _stacks_exactly(codec: Codec, first: Encoded, second: Encoded) -> bool:
    """One-time check that decoding two stacked blocks equals decoding them apart."""
    verdict = codec.__dict__.get(_VERDICT)
    if verdict is None:
        run = _new_run(first, None)
        run.append(second)
        try:
            together = run.decode(codec)
            apart = torch.cat([codec.decode(first), codec.decode(second)], dim=-2)
            verdict = together.shape == apart.shape and bool(torch.equal(together, apart))
        except Exception:  # a codec that cannot decode stacked blocks keeps them apart
            verdict = False
        codec.__dict__[_VERDICT] = verdict
    return verdict


class BlockStore:
    """The encoded middle of one layer's keys or values: a list of runs of blocks, oldest first."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._last: Encoded | None = None  # the newest block, kept for the stacking check

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    def append(self, enc: Encoded, codec: Codec) -> None:
        """Add one encoded block of x [*lead, tokens, head_dim] after the others."""
        lead = len(enc.shape) - 2
        signature = _signature(enc, lead)
        last = self.runs[-1] if self.runs else None
        if (
            last is not None and signature is not None and last.signature == signature
            and self._last is not None and _stacks_exactly(codec, self._last, enc)
        ):
            last.append(enc)
        else:
            self.runs.append(_new_run(enc, signature))
        self._last = enc if signature is not None else None

    def decode(self, codec: Codec) -> torch.Tensor | None:
        """All blocks decoded, float [*lead, tokens, head_dim]; None when empty."""
        parts = [r.decode(codec) for r in self.runs if r.count]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def drop_before(self, tokens: int) -> int:
        """Drop whole blocks lying entirely in the first `tokens` tokens; returns tokens dropped."""
        dropped = 0
        while self.runs:
            run = self.runs[0]
            whole = min(run.count, (tokens - dropped) // run.block_tokens)
            if whole <= 0:
                break
            dropped += whole * run.block_tokens
            if whole < run.count:
                run.drop_first(whole)
                break
            self.runs.pop(0)
        if not self.runs:
            self._last = None
        return dropped

    def drop_after(self, keep: int) -> None:
        """Keep only the first `keep` tokens; raises if that cuts a block (it would need re-encoding)."""
        while self.runs and self.tokens > keep:
            run = self.runs[-1]
            excess = self.tokens - keep
            if excess >= run.tokens:
                self.runs.pop()
                continue
            if excess % run.block_tokens:
                raise ValueError(
                    f"cannot remove {excess} tokens from inside an encoded block of {run.block_tokens} tokens without "
                    "re-encoding; crop by whole blocks, or use a recent window (residual_length) covering the tokens to crop"
                )
            run.drop_last(excess // run.block_tokens)
        self._last = None

    def map_batch(self, fn) -> None:
        for run in self.runs:
            run.map_batch(fn)
        self._last = None
