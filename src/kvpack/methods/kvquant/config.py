"""The `kvquant-Nbit[-Ppct]` method family (KVQuant: nuqN datatypes, dense-and-sparse outliers).

Presets: kvquant-4bit, kvquant-4bit-1pct, kvquant-3bit, kvquant-3bit-1pct, kvquant-2bit,
kvquant-2bit-1pct; any N in 2..8 and P in [0, 50) work. Defaults: keys pre-RoPE, per-channel with
ranges and outlier thresholds fixed at calibration; values per-token with online ranges; one fp16
sink token; Fisher-weighted k-means codebooks, one per layer and K/V.
Weighting default: `F` (the reference code's). Measured on SmolLM2 at 3 bits with 1% outliers
(results/wikitext2-kvquant-ablation.json, 8 WikiText-2 windows): `F` +8.05%, `F * s^2` (`fisher-s2`,
the paper's Eq. 7) +7.15%, unweighted +9.70%, uniform grid +9.61% vs fp16. `fisher-s2` is better
there and is the recommended option; the default stays `F` so that recipes and the published
tables keep one meaning (changing it is a recipe-format-visible change, CALIBRATION_VERSION).
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
  minbits<M>                             smallest per-channel width under allocation (default 1)
"""
from __future__ import annotations

import re
from dataclasses import replace

from kvpack.errors import MethodError
from kvpack.methods.names import MethodSettings
from kvpack.methods.registry import Family, register_family

KVQUANT_PRESETS = [f"kvquant-{b}bit{p}" for b in (4, 3, 2) for p in ("", "-1pct")]
KVQUANT_OPTIONS = "fisher, fisher-s2, plain, uniform, out<P>, out-vector, out-matrix, qnorm, no-qnorm, cb-layer, cb-head, cb-channel, vspan-all, vspan-head, alloc-none, alloc-tensor, alloc-global, minbits<M>"
_NAME = re.compile(r"^kvquant-(?P<bits>\d+)bit(?:-(?P<pct>\d+(?:\.\d+)?)pct)?$")
_OUT = re.compile(r"^out(?P<pct>\d+(?:\.\d+)?)$")
_CHOICES = {
    "fisher": ("weighting", "fisher"), "fisher-s2": ("weighting", "fisher-s2"),
    "plain": ("weighting", "plain"), "uniform": ("weighting", "uniform"),
    "out-vector": ("outlier_scope", "vector"), "out-matrix": ("outlier_scope", "matrix"),
    "qnorm": ("qnorm", True), "no-qnorm": ("qnorm", False),
    "cb-layer": ("codebook", "layer"), "cb-head": ("codebook", "head"), "cb-channel": ("codebook", "channel"),
    "vspan-all": ("value_span", "all"), "vspan-head": ("value_span", "head"),
    "alloc-none": ("alloc", "none"), "alloc-tensor": ("alloc", "tensor"), "alloc-global": ("alloc", "global"),
}


def _fraction(pct_text: str, where: str) -> float:
    pct = float(pct_text)
    if not 0 <= pct < 50:
        raise MethodError(f"outlier percentage must be in [0, 50), got '{where}'.")
    return pct / 100


def kvquant_settings(preset: str) -> MethodSettings:
    """Settings of a `kvquant-Nbit[-Ppct]` name; the KVQuant-specific ones live in `extra`."""
    match = _NAME.match(preset)
    if not match:
        raise MethodError(f"'{preset}' is not a KVQuant method name; use kvquant-Nbit or kvquant-Nbit-Ppct, e.g. kvquant-3bit-1pct.")
    bits = int(match["bits"])
    if not 2 <= bits <= 8:
        raise MethodError(f"'{preset}': bit width must be in 2..8.")
    return MethodSettings(
        name=preset, family="kvquant", bits=bits, key_axis="channel", value_axis="token", pre_rope=True, sink_tokens=1,
        extra={
            "outlier_frac": _fraction(match["pct"], preset) if match["pct"] else 0.0,
            "weighting": "fisher", "outlier_scope": "vector", "qnorm": bits <= 2,
            "codebook": "layer", "value_span": "all", "alloc": "none", "min_bits": 1,
        },
    )


def kvquant_option(settings: MethodSettings, option: str) -> MethodSettings | None:
    """Apply a KVQuant-only `:option`; None when `option` is not one of them."""
    extra = dict(settings.extra)
    if option in _CHOICES:
        key, value = _CHOICES[option]
        extra[key] = value
        return replace(settings, extra=extra)
    match = re.fullmatch(r"minbits(\d)", option)
    if match:
        extra["min_bits"] = int(match[1])
        return replace(settings, extra=extra)
    match = _OUT.match(option)
    if match:
        extra["outlier_frac"] = _fraction(match["pct"], option)
        return replace(settings, extra=extra)
    return None


register_family(Family(
    name="kvquant", matches=lambda preset: preset.startswith("kvquant-"), settings=kvquant_settings, calibrated=True,
    option=kvquant_option,
))
