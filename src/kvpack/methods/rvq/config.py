"""Names and options of the `rvq-dD-cC-gG` family: residual VQ with depth D, C codes per stage, groups of g channels.

Presets: rvq-d8-c2048-g32 (the paper's headline: 2.875 bits at head_dim 128, 3.0 at head_dim 64),
rvq-d4-c2048-g32, rvq-d8-c1024-g64, rvq-d6-c1024-g32; any D, power-of-two C and g work.
Keys are always taken pre-RoPE. Options (after ':'):
  key-strided | key-contiguous       channel grouping of keys (default strided)
  value-strided | value-contiguous   channel grouping of values (default contiguous)
  ema | kmeans-only                  codebooks: k-means init then EMA updates (default), or k-means only
  <P>pct                             dense-and-sparse: P% of elements (per head and channel thresholds
                                     fitted at calibration) kept in fp16 before VQ, e.g. 1pct, 0.5pct
  share<N> | share-all               one set of codebooks (keys, and one for values) per N consecutive
                                     layers, or for the whole model, trained on their pooled rows:
                                     N times fewer codebook bytes (default share1: one per layer)
and the generic sink<N>, recent<N>, g<N>.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kvpack.errors import MethodError
from kvpack.methods.settings import FamilyOptions, MethodSettings, percentage

PRESETS = ("rvq-d8-c2048-g32", "rvq-d4-c2048-g32", "rvq-d8-c1024-g64", "rvq-d6-c1024-g32")
OPTIONS_HELP = "key-strided, key-contiguous, value-strided, value-contiguous, ema, kmeans-only, <P>pct, share<N>, share-all"
_NAME = re.compile(r"^rvq-d(?P<depth>\d+)-c(?P<codes>\d+)-g(?P<group>\d+)$")
_PCT = re.compile(r"^(?P<pct>\d+(?:\.\d+)?)pct$")


@dataclass(frozen=True)
class RVQOptions(FamilyOptions):
    """Residual VQ's own settings; the group size is the generic key_group / value_group."""

    depth: int = 8
    codes: int = 2048
    key_grouping: str = "strided"  # strided | contiguous
    value_grouping: str = "contiguous"
    codebook_training: str = "ema"  # ema | kmeans
    outliers: float = 0.0  # fraction of elements kept in fp16 before VQ
    share_layers: int = 1  # consecutive layers sharing one set of codebooks; 0 = every layer


_CHOICES = {
    "key-strided": ("key_grouping", "strided"), "key-contiguous": ("key_grouping", "contiguous"),
    "value-strided": ("value_grouping", "strided"), "value-contiguous": ("value_grouping", "contiguous"),
    "ema": ("codebook_training", "ema"), "kmeans-only": ("codebook_training", "kmeans"),
}


def rvq_settings(preset: str) -> MethodSettings:
    """Settings of an `rvq-dD-cC-gG` name."""
    match = _NAME.match(preset)
    if not match:
        raise MethodError(f"'{preset}' is not an RVQ method name; use rvq-dD-cC-gG, e.g. rvq-d8-c2048-g32.")
    depth, codes, group = int(match["depth"]), int(match["codes"]), int(match["group"])
    if not 1 <= depth <= 64:
        raise MethodError(f"'{preset}': depth must be in 1..64.")
    if codes < 2 or codes > 1 << 16 or codes & (codes - 1):
        raise MethodError(f"'{preset}': the codebook size must be a power of two in 2..65536 (codes are log2(C)-bit).")
    if group < 1:
        raise MethodError(f"'{preset}': the group size must be >= 1.")
    return MethodSettings(name=preset, family="rvq", bits=codes.bit_length() - 1, key_group=group, value_group=group,
                          pre_rope=True, options=RVQOptions(depth=depth, codes=codes))


def rvq_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """Apply an RVQ-only `:option`; None when `option` is not one of them."""
    if option in _CHOICES:
        field, value = _CHOICES[option]
        return replace(settings, options=replace(settings.options, **{field: value}))
    if option == "share-all":
        return replace(settings, options=replace(settings.options, share_layers=0))
    match = re.fullmatch(r"share(\d+)", option)
    if match:
        if int(match[1]) < 1:
            raise MethodError(f"'{option}': share<N> needs N >= 1 layers per codebook set (share-all: one for the model).")
        return replace(settings, options=replace(settings.options, share_layers=int(match[1])))
    match = _PCT.match(option)
    if match:
        return replace(settings, options=replace(settings.options, outliers=percentage(match["pct"], option)))
    return None
