"""Synthetic K/V-like data for codecs whose stored bytes are measured without calibration (`kvpack plan`)."""
from __future__ import annotations

import torch


def synthetic_kv(heads: int, tokens: int, head_dim: int, seed: int) -> torch.Tensor:
    """K/V-like data [1, heads, tokens, head_dim]: Gaussian with log-normal per-channel magnitudes (the same
    magnitudes for every seed, so per-channel thresholds fitted on one draw hold for the next)."""
    spread = torch.exp(0.7 * torch.randn(1, heads, 1, head_dim, generator=torch.Generator().manual_seed(12345)))
    return torch.randn(1, heads, tokens, head_dim, generator=torch.Generator().manual_seed(seed)) * spread
