"""cos/sin of standard rotary embeddings (HF "rotate_half" convention) for arbitrary positions.

The serde sees keys after RoPE; with the chunk's `cached_positions` it rotates them back with
`kvpack.hf.rope.invert_rope`, stores them pre-RoPE, and rotates them forward again on load. The
rotation is undone with the same cos/sin it is redone with, so the round trip is exact up to the
quantization; `theta` must match the model for the stored keys to be truly pre-RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.hf.rope import apply_rope, invert_rope


@dataclass(frozen=True)
class RopeSpec:
    """Default RoPE: inv_freq_i = theta^(-2i/rot_dim) over the first `rot_dim` channels of a head."""

    theta: float
    rot_dim: int

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [tokens] (int) -> (cos, sin) [1, tokens, rot_dim] float32, computed as transformers does."""
        exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.int64).float() / self.rot_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None], emb.sin()[None]

    def unrotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys [heads, tokens, head_dim] -> pre-RoPE (float32)."""
        return invert_rope(keys[None].float(), cos, sin)[0]

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys [heads, tokens, head_dim] -> post-RoPE (float32)."""
        return apply_rope(keys[None].float(), cos, sin)[0]
