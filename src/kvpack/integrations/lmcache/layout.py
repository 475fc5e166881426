"""LMCache KV chunk layouts and the per-layer K/V views the codecs work on.

One LMCache object holds one or more groups (`MemoryObjMetadata.shapes` / `.dtypes`), each a chunk
of `tokens` tokens for `layers` layers:
- "kv_2ltd" (MemoryFormat.KV_2LTD): [2, layers, tokens, kv_heads * head_dim], K at [0], V at [1];
- "fused"   (vLLM's fused-K/V formats, kv_size 1): [layers, tokens, kv_heads * 2 * head_dim] where
  each head's row is [K (head_dim) | V (head_dim)].
A codec takes x [heads, tokens, head_dim] per layer and per K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.integrations.lmcache.errors import SerdeConfigError

LAYOUTS = ("auto", "kv_2ltd", "fused")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GroupLayout:
    """Shape facts of one group of an LMCache chunk."""

    kind: str  # "kv_2ltd" | "fused"
    shape: tuple[int, ...]
    dtype: torch.dtype
    layers: int
    tokens: int
    heads: int
    head_dim: int

    def describe(self) -> list:
        """JSON-able identity written into every chunk header."""
        return [self.kind, list(self.shape), str(self.dtype).removeprefix("torch.")]

    def _rows(self, t: torch.Tensor, layer: int, role: int) -> torch.Tensor:
        """View [tokens, heads, head_dim] of K (role 0) or V (role 1) of `layer` in the group tensor t."""
        if tuple(t.shape) != self.shape:
            raise SerdeConfigError(f"group tensor has shape {tuple(t.shape)}, its layout says {self.shape}")
        if self.kind == "kv_2ltd":
            return t[role, layer].view(self.tokens, self.heads, self.head_dim)
        return t[layer].view(self.tokens, self.heads, 2, self.head_dim)[:, :, role]

    def read(self, t: torch.Tensor, layer: int, role: int) -> torch.Tensor:
        """K or V of one layer as float32 [heads, tokens, head_dim]."""
        return self._rows(t, layer, role).transpose(0, 1).float()

    def write(self, t: torch.Tensor, layer: int, role: int, x: torch.Tensor) -> None:
        """Store x [heads, tokens, head_dim] as K or V of one layer of t (cast to t's dtype)."""
        self._rows(t, layer, role).copy_(x.transpose(0, 1))


def group_layout(shape, dtype: torch.dtype, kind: str, head_dim: int | None, heads: int | None) -> GroupLayout:
    """Interpret one LMCache group (shape, dtype); `kind` is "auto", "kv_2ltd" or "fused"."""
    shape = tuple(int(s) for s in shape)
    if kind not in LAYOUTS:
        raise SerdeConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {kind!r}")
    if dtype not in FLOAT_DTYPES:
        raise SerdeConfigError(f"the kvpack serde stores floating-point KV (bf16, fp16, fp32), got {dtype}")
    if kind == "auto":
        kind = "kv_2ltd" if len(shape) == 4 and shape[0] == 2 else "fused" if len(shape) == 3 else ""
    if kind == "kv_2ltd" and (len(shape) != 4 or shape[0] != 2):
        raise SerdeConfigError(f"KV_2LTD chunks are [2, layers, tokens, kv_heads * head_dim], got {list(shape)}")
    if kind == "fused" and len(shape) != 3:
        raise SerdeConfigError(f"fused K/V chunks are [layers, tokens, kv_heads * 2 * head_dim], got {list(shape)}")
    if not kind:
        raise SerdeConfigError(
            f"unsupported LMCache chunk shape {list(shape)}: the kvpack serde reads KV_2LTD [2, layers, tokens, "
            "kv_heads * head_dim] and fused [layers, tokens, kv_heads * 2 * head_dim] (MLA latents are not K/V)"
        )
    layers, tokens, width = shape[-3:]
    per_head_width = width if kind == "kv_2ltd" else width // 2
    if kind == "fused" and width % 2:
        raise SerdeConfigError(f"fused K/V width {width} is odd; it must be kv_heads * 2 * head_dim")
    if head_dim is None and heads is None:
        raise SerdeConfigError("pass head_dim (or num_kv_heads) in the serde kwargs: the recipe does not say it")
    if head_dim is None:
        head_dim = per_head_width // heads
    if heads is None:
        heads = per_head_width // head_dim
    if heads * head_dim != per_head_width:
        raise SerdeConfigError(
            f"chunk width {width} ({kind}) does not split into {heads} KV heads of head_dim {head_dim}; "
            "check head_dim / num_kv_heads in the serde kwargs"
        )
    return GroupLayout(kind, shape, dtype, layers, tokens, heads, head_dim)
