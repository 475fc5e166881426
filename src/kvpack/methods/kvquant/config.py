"""Names and options of the `kvquant-Nbit[-Ppct]` family (KVQuant: nuqN datatypes, dense-and-sparse outliers).

Presets: kvquant-4bit, kvquant-4bit-1pct, kvquant-3bit, kvquant-3bit-1pct, kvquant-2bit,
kvquant-2bit-1pct; any N in 2..8 and P in [0, 50) work. Defaults: keys pre-RoPE, per-channel with
ranges and outlier thresholds fixed at calibration; values per-token with online ranges; one fp16
sink token; Fisher-weighted k-means codebooks, one per layer and K/V; k-means weights `F` (the
reference code's; the paper's Eq. 7 `F * s^2` is the `fisher-s2` option, compared in results/).
Options (after ':'), beside the generic post-rope, key-token, sink<N>:
  fisher | fisher-s2 | plain | uniform   k-means weights: F, F * scale^2, none; uniform = int grid
  out<P>                                 outlier percentage (overrides the preset's -Ppct), e.g. out0.5
  out-vector | out-matrix                per-vector outlier thresholds, or one pair per head and layer
  qnorm | no-qnorm                       Q-Norm on the decoded levels (default: on at 2 bits only)
  cb-layer | cb-head | cb-channel        one codebook per layer, per KV head, or per channel
  vspan-all | vspan-head                 value ranges over all KV heads of a token, or per head
  alloc-none | alloc-tensor | alloc-global  per-channel bit widths by Fisher-weighted error (beyond the
                                         paper): none (one width), mean N per layer's K or V, or mean N
                                         over the whole model; implies per-channel codebooks
  alloc-layer                            one width per layer's K and per layer's V (mean N over the
                                         model) by Fisher-weighted error; codebooks stay per layer
  minbits<M>                             smallest per-channel width under allocation (default 1)
  budget<T>                              per-channel allocation pays each channel's codebook from the
                                         code budget of T tokens (default 2048): at T tokens codes and
                                         codebooks take at most N bits per element; budget0 = a mean
                                         width of N, codebooks on top. Width counts per tensor are
                                         multiples of 8 (what the CPU kernel reads)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kvpack.errors import MethodError
from kvpack.methods.settings import FamilyOptions, MethodSettings, percentage

PRESETS = tuple(f"kvquant-{b}bit{p}" for b in (4, 3, 2) for p in ("", "-1pct"))
OPTIONS_HELP = ("fisher, fisher-s2, plain, uniform, out<P>, out-vector, out-matrix, qnorm, no-qnorm, cb-layer, cb-head, "
                "cb-channel, vspan-all, vspan-head, alloc-none, alloc-layer, alloc-tensor, alloc-global, minbits<M>, budget<T>")
_NAME = re.compile(r"^kvquant-(?P<bits>\d+)bit(?:-(?P<pct>\d+(?:\.\d+)?)pct)?$")
_OUT = re.compile(r"^out(?P<pct>\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class KVQuantOptions(FamilyOptions):
    """KVQuant's own settings (see the module docstring for the option that sets each)."""

    outlier_frac: float = 0.0
    weighting: str = "fisher"  # fisher | fisher-s2 | plain | uniform
    outlier_scope: str = "vector"  # vector | matrix
    qnorm: bool = False
    codebook: str = "layer"  # layer | head | channel
    value_span: str = "all"  # all | head
    alloc: str = "none"  # none | layer | tensor | global
    min_bits: int = 1
    budget_tokens: int = 2048  # per-channel allocation: codebooks paid from T tokens of codes (0: not counted)


_CHOICES = {
    "fisher": ("weighting", "fisher"), "fisher-s2": ("weighting", "fisher-s2"),
    "plain": ("weighting", "plain"), "uniform": ("weighting", "uniform"),
    "out-vector": ("outlier_scope", "vector"), "out-matrix": ("outlier_scope", "matrix"),
    "qnorm": ("qnorm", True), "no-qnorm": ("qnorm", False),
    "cb-layer": ("codebook", "layer"), "cb-head": ("codebook", "head"), "cb-channel": ("codebook", "channel"),
    "vspan-all": ("value_span", "all"), "vspan-head": ("value_span", "head"),
    "alloc-none": ("alloc", "none"), "alloc-layer": ("alloc", "layer"), "alloc-tensor": ("alloc", "tensor"), "alloc-global": ("alloc", "global"),
}


def kvquant_settings(preset: str) -> MethodSettings:
    """Settings of a `kvquant-Nbit[-Ppct]` name."""
    match = _NAME.match(preset)
    if not match:
        raise MethodError(f"'{preset}' is not a KVQuant method name; use kvquant-Nbit or kvquant-Nbit-Ppct, e.g. kvquant-3bit-1pct.")
    bits = int(match["bits"])
    if not 2 <= bits <= 8:
        raise MethodError(f"'{preset}': bit width must be in 2..8.")
    options = KVQuantOptions(outlier_frac=percentage(match["pct"], preset) if match["pct"] else 0.0, qnorm=bits <= 2)
    return MethodSettings(name=preset, family="kvquant", bits=bits, key_axis="channel", value_axis="token",
                          pre_rope=True, sink_tokens=1, options=options)


def kvquant_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """Apply a KVQuant-only `:option`; None when `option` is not one of them."""
    options: KVQuantOptions = settings.options
    if option in _CHOICES:
        field, value = _CHOICES[option]
        return replace(settings, options=replace(options, **{field: value}))
    match = re.fullmatch(r"budget(\d+)", option)
    if match:
        return replace(settings, options=replace(options, budget_tokens=int(match[1])))
    match = re.fullmatch(r"minbits(\d)", option)
    if match:
        return replace(settings, options=replace(options, min_bits=int(match[1])))
    match = _OUT.match(option)
    if match:
        return replace(settings, options=replace(options, outlier_frac=percentage(match["pct"], option)))
    return None
