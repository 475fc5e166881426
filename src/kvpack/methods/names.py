"""Method names -> settings: `preset[:option...]`, parsed by the preset's family.

Canonical names re-parse to the same settings: flags that change the preset show up in the name,
and of repeated options the last (the one that takes effect) is kept.
"""
from __future__ import annotations

from dataclasses import replace

from kvpack.errors import MethodError
from kvpack.methods.registry import family_named, family_of
from kvpack.methods.settings import GENERIC_OPTIONS, MethodSettings, generic_option


def apply_option(settings: MethodSettings, option: str) -> MethodSettings:
    """`settings` changed by one `:option` modifier (the family's own, or a generic one)."""
    family = family_named(settings.family)
    changed = family.option(settings, option)
    if changed is None:
        changed = generic_option(settings, option)
    if changed is None:
        own = f"; {family.name} options: {family.options_help}" if family.options_help else ""
        raise MethodError(f"Unknown method option '{option}'. Options: {GENERIC_OPTIONS}{own}.")
    return changed


def parse_method(text: str, pre_rope: bool | None = None, key_axis: str | None = None) -> MethodSettings:
    """Parse `preset[:option...]`; `pre_rope`/`key_axis` (the CLI flags) apply before the modifiers."""
    text = text.strip()
    if not text:
        raise MethodError("Empty method name.")
    preset, *options = text.split(":")
    settings = preset_settings = family_of(preset).settings(preset)
    if pre_rope is not None:
        settings = replace(settings, pre_rope=pre_rope)
    if key_axis is not None:
        if key_axis not in ("token", "channel"):
            raise MethodError(f"--key-axis must be 'token' or 'channel', got '{key_axis}'.")
        settings = replace(settings, key_axis=key_axis)
    for option in options:
        settings = apply_option(settings, option)
    suffix = list(options)
    if pre_rope or (pre_rope is False and preset_settings.pre_rope):
        suffix.insert(0, "pre-rope" if pre_rope else "post-rope")
    if key_axis == "channel" or (key_axis == "token" and preset_settings.key_axis != "token"):
        suffix.insert(0, f"key-{key_axis}")
    suffix = list(dict.fromkeys(reversed(suffix)))[::-1]
    return replace(settings, name=":".join([preset, *suffix]))


def needs_calibration(settings: MethodSettings) -> bool:
    """Whether `settings`' family fits its codecs to calibration data."""
    return family_named(settings.family).calibrated
