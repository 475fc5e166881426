"""Rotary embeddings for cached positions: the model's own rotary module, re-run on stored positions.

transformers hands the cache post-RoPE keys; a pre-RoPE cache rotates them back with the cos/sin
the attention layer received (exact: the rotation is orthogonal) and, when attention reads the
cache, rotates every stored key forward again at its stored position. That needs cos/sin for
arbitrary positions: `RopeSource` calls the model's rotary module (`rotary_emb`) with those
positions, passing the layer's type to modules that take one (Gemma3: separate local/global
RoPE). The first time a layer appends, the recomputed cos/sin are compared with the ones the
layer really used, so a model whose RoPE cannot be reproduced this way fails loudly.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from kvpack.errors import UnsupportedArchitectureError


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.split(".")[-1].startswith("rotary_emb")]


class RopeSource:
    """cos/sin [batch, tokens, rot_dim] for any positions, per attention layer of `model`."""

    def __init__(self, model: nn.Module, attention_layers: list[nn.Module], layer_types: list[str]):
        modules = _rotary_modules(model)
        if len(modules) != 1:
            names = [n for n, _ in model.named_modules() if n.split(".")[-1].startswith("rotary_emb")]
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: expected one rotary embedding module named 'rotary_emb', found {names or 'none'}; "
                "a pre-RoPE compressed cache cannot re-apply RoPE here. Use a post-RoPE method (drop ':pre-rope')."
            )
        self.module = modules[0]
        params = inspect.signature(self.module.forward).parameters
        self.takes_layer_type = "layer_type" in params
        self.layer_keys: list[str | None] = []
        for idx, attn in enumerate(attention_layers):
            kind = getattr(attn, "layer_type", None) or (layer_types[idx] if idx < len(layer_types) else None)
            self.layer_keys.append(kind if self.takes_layer_type else None)
        self.verified: set[int] = set()

    def key(self, layer_idx: int) -> str | None:
        """Layers with equal keys share cos/sin."""
        return self.layer_keys[layer_idx]

    @torch.no_grad()
    def compute(self, layer_idx: int, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [batch, tokens] (int) -> (cos, sin) [batch, tokens, rot_dim] in `dtype`."""
        probe = torch.empty(1, dtype=dtype, device=positions.device)
        pos = positions.long()
        if self.takes_layer_type:
            return self.module(probe, pos, self.layer_keys[layer_idx])
        return self.module(probe, pos)

    def verify(self, layer_idx: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Check once per layer that `compute` reproduces the cos/sin the layer received."""
        if layer_idx in self.verified:
            return
        mine_cos, mine_sin = self.compute(layer_idx, positions, cos.dtype)
        mine_cos, mine_sin = mine_cos.expand_as(cos), mine_sin.expand_as(sin)
        tol = 1e-5 if cos.dtype == torch.float32 else 1e-2
        if not (torch.allclose(mine_cos, cos, atol=tol, rtol=0) and torch.allclose(mine_sin, sin, atol=tol, rtol=0)):
            raise UnsupportedArchitectureError(
                f"Layer {layer_idx}: the model's rotary module does not reproduce the cos/sin its attention used "
                f"(max difference {float((mine_cos - cos).abs().max()):.3g}); pre-RoPE caching is not possible for this "
                "model. Use a post-RoPE method (drop ':pre-rope')."
            )
        self.verified.add(layer_idx)
