"""The codec interface: one quantizer per file behind it.

A codec turns a block of vectors x [..., tokens, head_dim] into `Encoded` storage (real packed
tensors whose byte counts are the honest size) and back. `shared_nbytes()` is storage shared by
every block of a layer (codebooks), amortized over the context by whoever reports bits.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class Encoded:
    """Packed storage of one block: named tensors plus the original shape."""

    tensors: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_element(self) -> float:
        numel = 1
        for s in self.shape:
            numel *= s
        return 8.0 * self.nbytes() / max(numel, 1)


@dataclass(frozen=True)
class StorageLayout:
    """What a codec's Encoded blocks hold, declared by the codec for the cache, memory report and kernels.

    parts: tensor name -> "codes" | "scales" | "outliers" (every tensor `encode` may produce).
    outlier_rows: None, or the row kind of the sparse outliers (codecs.sparse: "token_all" | "token_head").
    Blocks of equal shape always concatenate along dim 0 and decode as one (every codec guarantees it).
    """

    parts: dict[str, str]
    outlier_rows: str | None = None


CODEC_TYPES: dict[str, type["Codec"]] = {}


def register_codec(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: make `cls` rebuildable from its saved state (recipe files)."""
    CODEC_TYPES[cls.__name__] = cls
    return cls


def codec_from_state(kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> "Codec":
    """Rebuild a codec saved with `Codec.state()`."""
    if kind not in CODEC_TYPES:
        raise ValueError(f"unknown codec type '{kind}' (known: {', '.join(sorted(CODEC_TYPES))})")
    return CODEC_TYPES[kind].from_state(config, tensors)


class Codec(ABC):
    """Quantizer for keys or values of one layer."""

    name: str = "codec"

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able config, tensors) that `from_state` rebuilds this codec from."""
        return self.config(), {}

    def config(self) -> dict:
        """Constructor arguments as JSON-able values."""
        return {}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Codec":
        return cls(**config)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Encoded:
        """x [..., tokens, head_dim] -> packed storage."""

    @abstractmethod
    def decode(self, enc: Encoded) -> torch.Tensor:
        """Packed storage -> float32 tensor of `enc.shape`."""

    @abstractmethod
    def layout(self) -> StorageLayout:
        """The parts of every block this codec encodes (see StorageLayout)."""

    def code_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one encoded block of x `shape` [..., heads, tokens, head_dim] without its outliers
        (data-independent: the size of codes and scales); measured by encoding zeros."""
        enc = self.encode(torch.zeros(shape, device=self.device))
        parts = self.layout().parts
        return sum(t.numel() * t.element_size() for n, t in enc.tensors.items() if parts.get(n) != "outliers")

    @property
    def device(self) -> torch.device:
        """Where this codec's tensors live (and where it encodes)."""
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "Codec":
        """This codec with every tensor it holds on `device`: a new object when anything moves, made once per
        device and kept with this codec (every cache of a recipe shares it: per-model state exists once per
        device). Tensors keep their dtype, whatever the model's: decode returns float32."""
        device = torch.device(device)
        if self.device == device:
            return self
        twins = self.__dict__.setdefault("_device_copies", {})  # shared by this codec and all its copies
        twins.setdefault(str(self.device), self)
        if str(device) in twins:
            return twins[str(device)]
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
            elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                setattr(moved, name, tuple(v.to(device) for v in value))
            elif name.startswith("_kvpack_"):  # per-device constants the kernels derived
                delattr(moved, name)
        twins[str(moved.device)] = twins[str(device)] = moved
        return moved

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded | None:
        """Tokens start..stop-1 of block `enc` (x [..., tokens, head_dim]) exactly as encoding them alone would
        store them (a crop inside a block, as assisted decoding does; a token range read by blockwise attention),
        or None when this codec's storage cannot be cut there."""
        return None

    def split_tokens(self, enc: Encoded) -> Encoded | None:
        """Block `enc` (x [B, H, T, D]) as T one-token blocks (x [T * B, H, 1, D], block-major) where that is only a
        reshaping of its tensors (no copy), else None. A store keeps one-token blocks of every length in one run."""
        return None

    def shared_nbytes(self) -> int:
        """Bytes of per-layer storage shared by all blocks (codebooks); 0 for baselines."""
        return 0

    def token_group(self) -> int:
        """Tokens that must be encoded together (1 unless statistics are taken over tokens in groups)."""
        return 1

    def roundtrip(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Quantize-dequantize x; returns (x_hat in x's dtype, stored bytes)."""
        enc = self.encode(x)
        return self.decode(enc).to(x.dtype), enc.nbytes()


def token_range(shape: tuple[int, ...], start: int, stop: int) -> tuple[int, ...]:
    """x shape [..., tokens, head_dim] of tokens start..stop-1 of a block of x `shape` (checks the range)."""
    if not 0 <= start < stop <= shape[-2]:
        raise ValueError(f"token range {start}..{stop} is not inside a block of {shape[-2]} tokens")
    return (*shape[:-2], stop - start, shape[-1])


def packed_token_range(codes: torch.Tensor, start: int, stop: int, tokens: int, dim: int,
                       bits: int) -> torch.Tensor | None:
    """Bytes of token rows start..stop-1 of codes packed token-major per leading row ([..., bytes of tokens * dim
    codes], little-endian bitstream): a slice when both ends fall on a byte (or `stop` is the last token), else None."""
    first, last = start * dim * bits, stop * dim * bits
    if first % 8 or (last % 8 and stop != tokens):
        return None
    return codes[..., first // 8: codes.shape[-1] if stop == tokens else last // 8]


def check_bits(bits: int, low: int = 1, high: int = 8) -> int:
    if not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"bit width must be an integer in {low}..{high}, got {bits!r}")
    return bits
