"""One layer's keys (pre-RoPE when the recipe says so) or values, in three stored parts, in token order:

    head  fp16 [batch, heads, h, head_dim]   the sink tokens (plus left padding), never quantized
    body  BlockStore of encoded blocks        quantized, appended block by block, never re-encoded
    tail  fp16 [batch, heads, t, head_dim]   the recent window and the unfinished token group

A token enters the body when it leaves the recent window, in whole token groups for codecs
that take statistics over groups of tokens (KIVI keys): the same split `simulate.fp16_split`
makes for a whole window. Tokens encoded in the same call form one block; sliding-window
layers cut blocks at `block_tokens` boundaries so that blocks leaving the window can be freed.
"""
from __future__ import annotations

import torch

from kvpack.cache.store import BlockStore
from kvpack.codecs import Codec, NuqCodec
from kvpack.kernels import cpu, triton_encode
from kvpack.kernels.reference import decode_range


def _encode_block(codec: Codec, x: torch.Tensor):
    """codec.encode(x), by a fused kernel when one covers the codec (identical bytes): Triton on CUDA
    (kernels/triton_encode.py), C++ on the CPU (kernels/cpu.py)."""
    if isinstance(codec, NuqCodec):
        fast = (triton_encode if x.is_cuda else cpu).nuq_encode(codec, x)
        if fast is not None:
            return fast
    return codec.encode(x)


class TokenStream:
    """Stored keys or values of one layer; see the module docstring."""

    __slots__ = ("codec", "group", "head_tokens", "recent", "block_tokens", "head", "body", "tail", "dropped",
                 "head_dropped")

    def __init__(self, codec: Codec, head_tokens: int, recent_tokens: int, block_tokens: int | None = None):
        self.codec = codec
        self.group = max(int(codec.token_group()), 1)
        self.head_tokens = head_tokens
        self.recent = recent_tokens
        self.block_tokens = None if block_tokens is None else max(self.group, block_tokens // self.group * self.group)
        self.head: torch.Tensor | None = None
        self.body = BlockStore()
        self.tail: torch.Tensor | None = None
        self.dropped = 0  # tokens freed from the front (sliding-window layers)
        self.head_dropped = False

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def head_len(self) -> int:
        return 0 if self.head is None else self.head.shape[-2]

    @property
    def tail_len(self) -> int:
        return 0 if self.tail is None else self.tail.shape[-2]

    @property
    def stored(self) -> int:
        """Tokens held now (head + body + tail)."""
        return self.head_len + self.body.tokens + self.tail_len

    @property
    def seen(self) -> int:
        """Tokens ever appended (stored + freed)."""
        return self.dropped + self.stored

    # -- writing ---------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """Add new tokens x [batch, heads, q, head_dim] (float, exact values) after the stored ones."""
        if not self.head_dropped and self.body.tokens == 0 and self.tail_len == 0 and self.head_len < self.head_tokens:
            take = min(self.head_tokens - self.head_len, x.shape[-2])
            part = x[..., :take, :].to(torch.float16)
            self.head = part if self.head is None else torch.cat([self.head, part], dim=-2)
            x = x[..., take:, :]
        if x.shape[-2] == 0:
            return
        pending = x if self.tail is None else torch.cat([self.tail.to(x.dtype), x], dim=-2)
        n = max(pending.shape[-2] - self.recent, 0)
        n -= n % self.group
        if n > 0:
            self._encode(pending[..., :n, :])
        rest = pending[..., n:, :].to(torch.float16)
        self.tail = rest if rest.shape[-2] else None

    def _encode(self, x: torch.Tensor) -> None:
        if self.block_tokens is None:
            self.body.append(_encode_block(self.codec, x), self.codec)
            return
        start = self.body.tokens + self.dropped_body_tokens
        pos = 0
        while pos < x.shape[-2]:
            room = self.block_tokens - (start + pos) % self.block_tokens
            end = min(x.shape[-2], pos + room)
            self.body.append(_encode_block(self.codec, x[..., pos:end, :]), self.codec)
            pos = end

    @property
    def dropped_body_tokens(self) -> int:
        return self.dropped - (self.head_tokens if self.head_dropped else 0)

    # -- reading ---------------------------------------------------------------------------------
    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """Every stored token, dequantized: [batch, heads, stored, head_dim] in `dtype`."""
        parts = []
        if self.head is not None:
            parts.append(self.head.to(dtype))
        body = self.body.decode(self.codec)
        if body is not None:
            parts.append(body.to(dtype))
        if self.tail is not None:
            parts.append(self.tail.to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def parts(self) -> list[tuple[int, int, object]]:
        """(first stored token, end, part) of the head tensor, each body run and the tail tensor, in token order."""
        out, pos = [], 0
        for part in (self.head, *self.body.runs, self.tail):
            n = 0 if part is None else (part.shape[-2] if isinstance(part, torch.Tensor) else part.tokens)
            if n:
                out.append((pos, pos + n, part))
                pos += n
        return out

    def cuts(self) -> list[int]:
        """Stored-token offsets where a piece starts or ends (head, every body block, tail): reading between two
        cuts never decodes part of a block."""
        out = [0]
        for start, end, part in self.parts():
            step = part.block_tokens if not isinstance(part, torch.Tensor) else end - start
            out.extend(range(start + step, end + 1, step))
        return out

    def read_range(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored tokens start..stop-1, dequantized: [batch, heads, stop - start, head_dim] in `dtype`. Decodes only
        the blocks (or token ranges of blocks, `Codec.slice_tokens`) overlapping the range; a block whose codec
        cannot cut its storage there is decoded whole and trimmed."""
        if not 0 <= start < stop <= self.stored:
            raise ValueError(f"token range {start}..{stop} is not inside the {self.stored} stored tokens")
        out = None
        for first, end, part in self.parts():
            lo, hi = max(start, first), min(stop, end)
            if lo >= hi:
                continue
            if isinstance(part, torch.Tensor):
                pieces = [(lo - first, part[..., lo - first: hi - first, :])]
            else:
                fast = cpu.mixed_decode(part, self.codec, lo - first, hi - first)
                pieces = [(lo - first, fast)] if fast is not None else decode_range(part, self.codec, lo - first,
                                                                                    hi - first, stop - start)
            for offset, x in pieces:
                if out is None:
                    out = torch.empty(*x.shape[:2], stop - start, x.shape[-1], dtype=dtype, device=x.device)
                at = first + offset - start
                out[..., at: at + x.shape[-2], :] = x
        return out

    # -- trimming --------------------------------------------------------------------------------
    def free_first(self, n: int) -> None:
        """Free exactly the `n` oldest stored tokens: the head as a whole, then whole body blocks, then
        tail tokens (sliding-window layers call this on a block grid, where it needs no re-encoding)."""
        if n <= 0:
            return
        if self.head is not None:
            if n < self.head_len:
                raise ValueError(f"cannot free {n} tokens from inside the {self.head_len}-token fp16 head")
            n -= self.head_len
            self.dropped += self.head_len
            self.head, self.head_dropped = None, True
        want = min(n, self.body.tokens)
        got = self.body.drop_before(want)
        if got != want:
            raise ValueError(f"cannot free {want} body tokens on block boundaries (freed {got})")
        self.dropped += got
        n -= got
        if n:
            if self.body.tokens or n > self.tail_len:
                raise ValueError(f"cannot free {n} more tokens: they are not at the front of the stored tokens")
            self.tail = self.tail[..., n:, :] if n < self.tail_len else None
            self.dropped += n

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` tokens ever appended (crop); freed tokens cannot come back."""
        keep_stored = keep - self.dropped
        if keep_stored < 0:
            raise ValueError(f"cannot crop to {keep} tokens: tokens before {self.dropped} were already freed from the sliding window")
        excess = self.stored - keep_stored
        if excess <= 0:
            return
        cut = min(excess, self.tail_len)
        if cut:
            self.tail = self.tail[..., : self.tail_len - cut, :] if cut < self.tail_len else None
            excess -= cut
        if excess:
            cut = min(excess, self.body.tokens)
            self.body.drop_after(self.body.tokens - cut, self.codec)
            excess -= cut
        if excess:
            self.head = self.head[..., : self.head_len - excess, :] if excess < self.head_len else None

    def map_batch(self, fn) -> None:
        """Apply fn to every stored tensor along its batch dim (beam reorder, batch select/repeat)."""
        if self.head is not None:
            self.head = fn(self.head)
        if self.tail is not None:
            self.tail = fn(self.tail)
        self.body.map_batch(fn, self.codec.layout())
