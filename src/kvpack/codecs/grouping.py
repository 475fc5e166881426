"""Views of x [..., tokens, head_dim] grouped for statistics.

axis="token": one scale/zero per token (statistics over channels, in groups of `group` channels).
axis="channel": one scale/zero per channel (statistics over tokens, in groups of `group` tokens).
"""
from __future__ import annotations

import torch

AXES = ("token", "channel")


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return axis


def grouped(x: torch.Tensor, axis: str, group: int | None) -> tuple[torch.Tensor, int]:
    """Return (view, reduce_dim): reducing `view` over `reduce_dim` with keepdim gives the statistics."""
    *lead, tokens, dim = x.shape
    if axis == "token":
        g = group or dim
        if dim % g:
            raise ValueError(f"head_dim {dim} is not divisible by the channel group size {g}")
        return x.reshape(*lead, tokens, dim // g, g), -1
    g = group or tokens
    if tokens % g:
        raise ValueError(f"{tokens} tokens are not a whole number of token groups of {g}")
    return x.reshape(*lead, tokens // g, g, dim), -2


def grouped_shape(shape: tuple[int, ...], axis: str, group: int | None) -> tuple[int, ...]:
    """Shape of `grouped(x, axis, group)[0]` for x of `shape`."""
    return tuple(grouped(torch.empty(shape, device="meta"), axis, group)[0].shape)
