"""Fitting KVQuant's per-layer state from calibration activations.

Per layer, for keys and for values:
1. ranges: keys per channel from calibration quantiles (frac/2, 1 - frac/2 with outliers, else
   min/max); values per token online (nothing to fit); per-matrix thresholds if asked;
2. normalize the calibration rows exactly as `NuqCodec.encode` will, drop the outliers;
3. weighted 1-D k-means on the normalized values (weights: Fisher `F`, `F * scale^2`, or none),
   or the uniform grid; one codebook per layer or per KV head;
4. Q-Norm (a, b) per codebook so that dequantized calibration data keep their mean and std.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .codecs.kmeans import assign, weighted_kmeans_1d
from .codecs.nuq import NuqCodec, range_to_zero_scale
from .collect import LayerActivations
from .errors import MethodError
from .methods import MethodSettings

WEIGHTINGS = ("fisher", "fisher-s2", "plain", "uniform")


def blocks(rows: torch.Tensor, heads: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Calibration rows [W * H * P, D] (window-major, then head, then token, as collected) -> [W, H, P, D]."""
    per_window_head = rows.shape[0] // num_heads
    counts = torch.bincount(heads, minlength=num_heads)
    if counts.min() != counts.max() or rows.shape[0] % num_heads:
        raise ValueError("calibration rows are not the same tokens for every KV head")
    # Infer P from the head labels: the first run of head 0.
    change = (heads != heads[0]).nonzero()
    p = int(change[0]) if change.numel() else per_window_head
    if rows.shape[0] % (num_heads * p) or not bool(
        (heads.view(-1, num_heads, p) == torch.arange(num_heads).view(1, num_heads, 1)).all()
    ):
        raise ValueError("calibration rows are not laid out window by window, head by head")
    return rows.view(-1, num_heads, p, rows.shape[-1])


def quantile(sorted_x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """Linear-interpolated quantile q of data already sorted along `dim` (as torch.quantile)."""
    n = sorted_x.shape[dim]
    pos = q * (n - 1)
    lo_i, frac = int(pos), pos - int(pos)
    lo = sorted_x.select(dim, lo_i)
    hi = sorted_x.select(dim, min(lo_i + 1, n - 1))
    return lo + (hi - lo) * frac


def _channel_ranges(x: torch.Tensor, frac: float, scope: str) -> dict[str, torch.Tensor]:
    """Offline per-channel state of x [W, H, P, D]: zero/scale [H, D] and per-matrix thresholds [H] if asked."""
    per_head = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # [H, W*P, D]
    out: dict[str, torch.Tensor] = {}
    if frac > 0 and scope == "matrix":
        flat = per_head.reshape(per_head.shape[0], -1).sort(-1).values
        out_lo, out_hi = quantile(flat, frac / 2, -1), quantile(flat, 1 - frac / 2, -1)
        inside = (per_head >= out_lo.view(-1, 1, 1)) & (per_head <= out_hi.view(-1, 1, 1))
        inf = torch.tensor(float("inf"))
        lo = per_head.where(inside, inf).amin(1)
        hi = per_head.where(inside, -inf).amax(1)
        lo, hi = lo.where(torch.isfinite(lo), 0.0), hi.where(torch.isfinite(hi), 0.0)
        out["out_lo"], out["out_hi"] = out_lo, out_hi
    elif frac > 0:
        ordered = per_head.sort(1).values
        lo, hi = quantile(ordered, frac / 2, 1), quantile(ordered, 1 - frac / 2, 1)
    else:
        lo, hi = per_head.amin(1), per_head.amax(1)
    out["zero"], out["scale"] = range_to_zero_scale(lo, hi)
    return out


def _token_thresholds(x: torch.Tensor, frac: float, scope: str) -> dict[str, torch.Tensor]:
    """Offline state of per-token codecs: only per-matrix outlier thresholds [H] (if asked)."""
    if frac > 0 and scope == "matrix":
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).sort(-1).values
        return {"out_lo": quantile(flat, frac / 2, -1), "out_hi": quantile(flat, 1 - frac / 2, -1)}
    return {}


def _levels(u: torch.Tensor, w: torch.Tensor | None, bits: int, weighting: str) -> torch.Tensor:
    if weighting == "uniform":
        return torch.linspace(-1, 1, 1 << bits)
    return weighted_kmeans_1d(u, 1 << bits, w)


def _qnorm(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(a, b) with mean/std of a * levels[assign(u)] + b equal to those of u [n]."""
    q = levels.to(torch.float16).float()[assign(u, levels.to(torch.float16).float())]
    m1, s1 = u.double().mean(), u.double().std()
    m2, s2 = q.double().mean(), q.double().std()
    a = s1 / s2 if s2 > 0 else torch.tensor(1.0, dtype=torch.float64)
    return torch.stack([a, m1 - m2 * a]).float()


def fit_nuq(
    x: torch.Tensor, fisher: torch.Tensor | None, axis: str, settings: MethodSettings, max_points: int | None = None,
    timing: dict | None = None,
) -> NuqCodec:
    """A fitted NuqCodec for calibration blocks x [W, H, P, D] (fisher: same shape, or None)."""
    extra = settings.extra
    frac, scope, weighting = extra["outlier_frac"], extra["outlier_scope"], extra["weighting"]
    heads, dim = x.shape[1], x.shape[-1]
    timing = timing if timing is not None else {}
    start = time.perf_counter()
    state = _channel_ranges(x, frac, scope) if axis == "channel" else _token_thresholds(x, frac, scope)
    common = dict(axis=axis, heads=heads, head_dim=dim, outlier_frac=frac, span=extra["value_span"], outlier_scope=scope)
    probe = NuqCodec(torch.linspace(-1, 1, 1 << settings.bits), **common, **state)
    u, mask, _, scale = probe.normalize(x)
    timing["thresholds"] = timing.get("thresholds", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    if weighting in ("fisher", "fisher-s2"):
        if fisher is None:
            raise MethodError(f"'{settings.name}': Fisher weighting needs Fisher information; collect with fisher=True.")
        w = fisher * scale.expand_as(fisher) ** 2 if weighting == "fisher-s2" else fisher
    else:
        w = None
    keep = ~mask if mask is not None else torch.ones_like(u, dtype=torch.bool)
    groups = [slice(None)] if extra["codebook"] == "layer" else [slice(h, h + 1) for h in range(heads)]
    levels, qnorm = [], []
    for g in groups:
        sel = keep[:, g]
        ug = u[:, g][sel].clamp(-1, 1)
        wg = None if w is None else w[:, g][sel]
        if max_points is not None and ug.numel() > max_points:  # deterministic thinning
            idx = torch.linspace(0, ug.numel() - 1, max_points).long()
            ug, wg = ug[idx], None if wg is None else wg[idx]
        lv = _levels(ug, wg, settings.bits, weighting)
        levels.append(lv)
        if extra["qnorm"]:
            qnorm.append(_qnorm(ug, lv))
    timing["kmeans"] = timing.get("kmeans", 0.0) + time.perf_counter() - start
    return NuqCodec(torch.stack(levels), **common, **state, qnorm=torch.stack(qnorm) if qnorm else None)


def fit_kvquant_recipe(
    model, activations: list[LayerActivations], settings: MethodSettings, progress: bool = True,
    max_points: int | None = None,
) -> tuple[list[NuqCodec], list[NuqCodec], dict]:
    """Fit per-layer key and value NuqCodecs; returns (key_codecs, value_codecs, info with timings)."""
    if settings.family != "kvquant":
        raise MethodError(f"fit_kvquant_recipe fits kvquant-* methods, not '{settings.name}'.")
    from .models import text_config

    cfg = text_config(model.config)
    num_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    timing: dict[str, float] = {}
    keys, values = [], []
    for layer in tqdm(activations, desc=f"fitting {settings.name}", unit="layer", disable=not progress):
        k = blocks(layer.keys, layer.heads, num_heads)
        v = blocks(layer.values, layer.heads, num_heads)
        kf = None if layer.key_fisher is None else blocks(layer.key_fisher, layer.heads, num_heads)
        vf = None if layer.value_fisher is None else blocks(layer.value_fisher, layer.heads, num_heads)
        keys.append(fit_nuq(k, kf, settings.key_axis, settings, max_points, timing))
        values.append(fit_nuq(v, vf, settings.value_axis, settings, max_points, timing))
    return keys, values, {"timing_s": timing}
