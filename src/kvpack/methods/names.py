"""Method names -> settings.

A method is a preset name optionally followed by `:option` modifiers, e.g.
`int4`, `int4:pre-rope:key-channel`, `nf3:g32`, `kivi-2:sink1`.

Options: `pre-rope` / `post-rope` (where keys are quantized), `key-channel` / `key-token`
(the axis keys share statistics along), `g<N>` (group size), `sink<N>` (first N tokens kept
in fp16), `recent<N>` (last N tokens kept in fp16).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from kvpack.errors import MethodError

BASELINE_PRESETS = ["fp16", "int8", "int4", "int3", "int2", "nf4", "nf3", "nf2", "kivi-4", "kivi-2"]
_FAMILY = re.compile(r"^(?P<family>fp16|int|nf|kivi-)(?P<bits>\d*)$")


@dataclass(frozen=True)
class MethodSettings:
    """Everything a method name says: datatype per K/V, axes, groups, where keys are taken, fp16 tokens."""

    name: str
    family: str  # fp16 | int | nf | kivi | (calibrated families register more)
    bits: int = 16
    key_axis: str = "token"
    value_axis: str = "token"
    key_group: int | None = None
    value_group: int | None = None
    pre_rope: bool = False
    sink_tokens: int = 0
    recent_tokens: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def _check_bits(family: str, bits_text: str) -> int:
    if not bits_text:
        raise MethodError(f"Method family '{family}' needs a bit width, e.g. '{family}4'.")
    bits = int(bits_text)
    low, high = (2, 4) if family == "kivi-" else (2, 8)
    if not low <= bits <= high:
        raise MethodError(f"'{family}{bits}': bit width must be in {low}..{high}.")
    return bits


def base_settings(preset: str) -> MethodSettings:
    """Settings of a baseline preset name without modifiers."""
    match = _FAMILY.match(preset)
    if not match:
        raise MethodError(
            f"Unknown method '{preset}'. Known: {', '.join(BASELINE_PRESETS)}, intN / nfN (N=2..8), kivi-N, "
            "kvquant-Nbit[-1pct], rvq-dD-cC-gG; options follow after ':' (e.g. int4:pre-rope:key-channel)."
        )
    family = match["family"]
    if family == "fp16":
        if match["bits"]:
            raise MethodError(f"'{preset}': fp16 takes no bit width.")
        return MethodSettings(name=preset, family="fp16")
    bits = _check_bits(family, match["bits"])
    if family == "kivi-":
        # KIVI: per-channel keys in groups of 32 tokens, per-token values in groups of 32 channels,
        # the most recent 128 tokens in full precision, keys post-RoPE as in the KIVI paper.
        return MethodSettings(
            name=preset, family="kivi", bits=bits, key_axis="channel", value_axis="token",
            key_group=32, value_group=32, recent_tokens=128,
        )
    return MethodSettings(name=preset, family=family, bits=bits)


def apply_option(settings: MethodSettings, option: str) -> MethodSettings:
    """Return `settings` changed by one `:option` modifier."""
    simple = {
        "pre-rope": {"pre_rope": True},
        "post-rope": {"pre_rope": False},
        "key-channel": {"key_axis": "channel"},
        "key-token": {"key_axis": "token"},
    }
    if option in simple:
        return replace(settings, **simple[option])
    for prefix, fields in (("g", ("key_group", "value_group")), ("sink", ("sink_tokens",)), ("recent", ("recent_tokens",))):
        match = re.fullmatch(prefix + r"(\d+)", option)
        if match:
            value = int(match[1])
            if prefix == "g" and value < 1:
                raise MethodError(f"group size must be >= 1 in '{option}'")
            return replace(settings, **{f: value for f in fields})
    from kvpack.methods.registry import family_option  # calibrated families add options of their own

    changed = family_option(settings, option)
    if changed is not None:
        return changed
    raise MethodError(
        f"Unknown method option '{option}'. Options: pre-rope, post-rope, key-channel, key-token, g<N>, sink<N>, recent<N>."
    )


def parse_method(text: str, pre_rope: bool | None = None, key_axis: str | None = None) -> MethodSettings:
    """Parse `preset[:option...]`; `pre_rope`/`key_axis` (the CLI flags) apply before the modifiers."""
    from kvpack.methods.registry import family_settings  # calibrated families live in their own modules

    text = text.strip()
    if not text:
        raise MethodError("Empty method name.")
    preset, *options = text.split(":")
    settings = preset_settings = family_settings(preset)
    if pre_rope is not None:
        settings = replace(settings, pre_rope=pre_rope)
    if key_axis is not None:
        if key_axis not in ("token", "channel"):
            raise MethodError(f"--key-axis must be 'token' or 'channel', got '{key_axis}'.")
        settings = replace(settings, key_axis=key_axis)
    for option in options:
        settings = apply_option(settings, option)
    # The name must re-parse to these settings: flags that change the preset show up in it, and of
    # repeated options the last (the one that takes effect) is kept.
    suffix = [o for o in options]
    if pre_rope or (pre_rope is False and preset_settings.pre_rope):
        suffix.insert(0, "pre-rope" if pre_rope else "post-rope")
    if key_axis == "channel" or (key_axis == "token" and preset_settings.key_axis != "token"):
        suffix.insert(0, f"key-{key_axis}")
    suffix = list(dict.fromkeys(reversed(suffix)))[::-1]
    return replace(settings, name=":".join([preset, *suffix]))
