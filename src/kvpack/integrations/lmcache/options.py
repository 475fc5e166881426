"""The serde's kwargs (the `"serde": {"type": "kvpack", ...}` dict of an LMCache L2 adapter)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from kvpack.integrations.lmcache.errors import SerdeConfigError


@dataclass(frozen=True)
class SerdeOptions:
    """method: any kvpack method name (e.g. "kvquant-3bit-1pct", "int4:pre-rope:key-channel");
    recipe: the folder of a calibrated recipe (`kvpack calibrate --out DIR`), needed by calibrated methods;
    fallback_method / fallback_recipe: a post-RoPE method for chunks that arrive without
      `cached_positions` when the main method stores keys pre-RoPE;
    head_dim / num_kv_heads: the model's, when the recipe does not say them (uncalibrated methods);
    rope_theta / partial_rotary_factor: the model's RoPE, for pre-RoPE methods;
    outlier_capacity: outlier slots per layer's K or V block, as a fraction of its elements
      (default 1.5 x the method's outlier fraction; never less than what the codec always stores, nor than
      the sink tokens of a block);
    layout: "auto", "kv_2ltd" or "fused"; group_layers: the model layer of each layer of each group
      (multi-group chunks whose groups are not consecutive layers);
    max_workers: threads of LMCache's serde processor."""

    method: str | None = None
    recipe: str | None = None
    fallback_method: str | None = None
    fallback_recipe: str | None = None
    head_dim: int | None = None
    num_kv_heads: int | None = None
    rope_theta: float | None = None
    partial_rotary_factor: float = 1.0
    outlier_capacity: float | None = None
    layout: str = "auto"
    group_layers: list | None = None
    max_workers: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "SerdeOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SerdeConfigError(f"unknown kvpack serde option(s) {unknown}; known: {', '.join(sorted(known))}")
        try:
            opts = cls(**kwargs)
            for name in ("head_dim", "num_kv_heads", "max_workers"):
                value = getattr(opts, name)
                if value is not None and (int(value) != value or int(value) < 1):
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if opts.outlier_capacity is not None and not 0 <= float(opts.outlier_capacity) < 1:
                raise ValueError(f"outlier_capacity is a fraction of elements in [0, 1), got {opts.outlier_capacity!r}")
        except (TypeError, ValueError) as exc:
            raise SerdeConfigError(f"invalid kvpack serde options: {exc}") from exc
        if not opts.method and not opts.recipe:
            raise SerdeConfigError('the kvpack serde needs "method" (a kvpack method name) and/or "recipe" (a recipe folder)')
        return opts
