"""Simulated quantization: quantize-dequantize keys and values inside one forward pass.

Per layer, the first `sink_tokens` and the most recent tokens stay in fp16; the tokens between
go through the layer's codec. Codecs that take statistics over groups of tokens (KIVI keys)
quantize only whole groups, so the fp16 tail holds the recent window plus the unfinished
group, exactly what a streaming cache holds at this length. Bits are counted from the packed
tensors the codecs really produce.

With a recent window (`recent_tokens` > 0) every query reads its *own* window, as a cache decoding token
by token holds it (`window_starts`, applied by the attention functions in hf/attention.py): query i reads
token j in fp16 (`kept`) from the first token its cache still holds in fp16 on, and quantized before (past
the sink). The quantized tokens are those the window-end split above quantizes, encoded from their fp16
copies as tokens leaving a window are (no query of the window reads a later token quantized).
`Simulator(recipe, served_window=False)` has every query read the window-end split instead (the last
`recent_tokens` of the whole window in fp16, what a one-shot prefill stores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.codecs.checks import check_finite, check_storable
from kvpack.recipes.recipe import Recipe


@dataclass
class BitCount:
    """Stored bits and element count, accumulated over layers, K and V; `shared_bits` is the part of
    `bits` that every sequence of the model shares (codebooks, rotations, ranges), counted once per
    forward pass as a cache of that one sequence would hold it."""

    bits: float = 0.0
    elements: int = 0
    shared_bits: float = 0.0

    def add(self, bits: float, elements: int) -> None:
        self.bits += bits
        self.elements += elements

    def add_shared(self, bits: float) -> None:
        self.bits += bits
        self.shared_bits += bits

    @property
    def per_element(self) -> float:
        """Everything stored, amortized over the elements."""
        return self.bits / max(self.elements, 1)

    @property
    def marginal_per_element(self) -> float:
        """What each further cached element costs: everything but the shared bits."""
        return (self.bits - self.shared_bits) / max(self.elements, 1)


def fp16_split(tokens: int, sink: int, recent: int, token_group: int) -> tuple[int, int]:
    """(start, stop) of the quantized token range for a sequence of `tokens` tokens."""
    start = min(sink, tokens)
    stop = max(start, tokens - recent)
    stop -= (stop - start) % max(token_group, 1)
    return start, stop


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x as a cache holds it in fp16 (rounded), in x's dtype."""
    return x.to(torch.float16).to(x.dtype)


class Simulator:
    """A KVTransform that quantize-dequantizes with `recipe` and counts the bits stored."""

    def __init__(self, recipe: Recipe, served_window: bool = True):
        self.recipe = recipe
        self.served_window = served_window
        self.pre_rope = recipe.settings.pre_rope
        self.count = BitCount()
        self.shared: dict[int, int] = {}  # id(codec) -> bytes every sequence shares (a codec shared by layers once)
        self._counted: set[int] = set()  # codecs whose shared bytes this forward pass has counted
        self._moved: dict = {}

    def _codec(self, codec, device: torch.device):
        """`codec` on `device`, moved once per codec and device."""
        key = (id(codec), device)
        if key not in self._moved:
            self._moved[key] = codec.to(device)
        return self._moved[key]

    def _process(self, x: torch.Tensor, codec, what: str) -> torch.Tensor:
        check_storable(x, what)
        codec = self._codec(codec, x.device)
        s = self.recipe.settings
        tokens = x.shape[-2]
        start, stop = fp16_split(tokens, s.sink_tokens, s.recent_tokens, codec.token_group())
        per_token = x[..., :1, :].numel()
        fp16_tokens = tokens - (stop - start)
        self.count.add(16.0 * fp16_tokens * per_token, x.numel())
        if stop == start:
            self._add_shared(codec, what)
            return _fp16(x)
        body = x[..., start:stop, :]
        if self.serves_window:  # a token decoded one by one is encoded from its fp16 window copy
            body = _fp16(body)
        middle, nbytes = codec.roundtrip(body)
        self.count.add(8.0 * nbytes, 0)
        # shared bytes after encoding: a codec that sizes itself to the head_dim it meets knows them only now
        self._add_shared(codec, what)
        parts = [_fp16(x[..., :start, :]), middle, _fp16(x[..., stop:, :])]
        return torch.cat(parts, dim=-2)

    def _add_shared(self, codec, what: str) -> None:
        self.shared[id(codec)] = codec.shared_nbytes()
        if id(codec) not in self._counted:
            self._counted.add(id(codec))
            self.count.add_shared(8.0 * self.shared[id(codec)])

    @property
    def serves_window(self) -> bool:
        """Whether queries read a recent window of their own (`served_window` and `recent_tokens` > 0)."""
        return self.served_window and self.recipe.settings.recent_tokens > 0

    def window_starts(self, layer_idx: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per query i of `tokens` [tokens] (int64), for keys and values: the first token past the sink that a
        streaming cache (cache/stream.py) holds in fp16 after appending token i, i.e. sink + the whole token
        groups that left the recent window; None without a served recent window."""
        if not self.serves_window:
            return None
        s = self.recipe.settings
        sink = min(s.sink_tokens, tokens)
        seen = torch.arange(1, tokens + 1) - sink - s.recent_tokens  # tokens past the sink and the window
        out = []
        for codec in (self.recipe.key_codecs[layer_idx], self.recipe.value_codecs[layer_idx]):
            group = max(int(codec.token_group()), 1)
            out.append(sink + seen.clamp_min(0) // group * group)
        return out[0], out[1]

    def kept(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as a cache keeps its sink and recent window: rounded to fp16."""
        return _fp16(key), _fp16(value)

    @property
    def fixed_bytes(self) -> int:
        """Bytes the model's codecs share across sequences (every layer's K and V seen so far, once)."""
        return sum(self.shared.values())

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0:  # a new forward pass: shared state is counted once per pass, as one sequence's cache holds it
            self._counted.clear()
        key = self._process(key, self.recipe.key_codecs[layer_idx], f"layer {layer_idx} keys")
        value = self._process(value, self.recipe.value_codecs[layer_idx], f"layer {layer_idx} values")
        return key, value
