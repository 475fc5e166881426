"""Rotary position embedding in the Hugging Face "rotate_half" convention, forward and exact inverse.

`cos`/`sin` are what the model's rotary module returns ([batch, tokens, rot_dim], possibly
multiplied by an attention scaling factor for YaRN-style variants); channel c is paired with
c + rot_dim/2. Models that rotate only the first `rot_dim` channels are handled.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [batch, tokens, d] -> [batch, 1, tokens, d] to broadcast over heads of x [batch, heads, tokens, d]
    return t.unsqueeze(1) if t.dim() == x.dim() - 1 else t


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, tokens, head_dim] by the angles in cos/sin [batch, tokens, rot_dim]."""
    cos, sin = _expand(cos, x).to(x.dtype), _expand(sin, x).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `apply_rope`: the rotation is orthogonal up to the factor cos^2 + sin^2 (1 without scaling)."""
    cos, sin = _expand(cos, x).to(x.dtype), _expand(sin, x).to(x.dtype)
    norm = cos * cos + sin * sin
    rot = cos.shape[-1]
    head = x[..., :rot]
    restored = (head * cos - rotate_half(head) * sin) / norm
    if rot == x.shape[-1]:
        return restored
    return torch.cat((restored, x[..., rot:]), dim=-1)
