"""Checks on keys and values before they are stored: finite, and within what 16-bit storage holds.

Sink and recent tokens, scales, zero-points and sparse outliers are stored in fp16, whatever the
model's dtype; a bf16 model's activations above fp16's largest value (65504) would silently become
inf there, so they are refused with the layer named instead.
"""
from __future__ import annotations

import torch

from kvpack.errors import ActivationRangeError, NonFiniteError

FP16_MAX = float(torch.finfo(torch.float16).max)


def check_finite(x: torch.Tensor, what: str) -> None:
    """NonFiniteError naming `what` if x holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"{what} contains NaN or inf; quantizing it would silently corrupt the cache. Check the model's dtype "
            "(float16 overflow: load with dtype=torch.float32 or bfloat16) and its input."
        )


def check_storable(x: torch.Tensor, what: str) -> None:
    """check_finite, then ActivationRangeError naming `what` if |x| exceeds fp16's range (65504)."""
    check_finite(x, what)
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    if peak > FP16_MAX:
        raise ActivationRangeError(
            f"{what} reach {peak:.4g}, beyond the fp16 range (65504) in which kvpack stores sink and recent tokens, "
            "scales and outliers; they would become inf. This model's activations need float32 or bf16 caching: "
            "use transformers' DynamicCache for it, or a method that keeps these layers uncompressed."
        )
