"""Fitting KVQuant's per-layer state from calibration activations.

Per layer, for keys and for values:
1. ranges: keys per channel from calibration quantiles (frac/2, 1 - frac/2 with outliers, else
   min/max); values per token online (nothing to fit); per-matrix thresholds if asked;
2. normalize the calibration rows exactly as `NuqCodec.encode` will, drop the outliers;
3. weighted 1-D k-means on the normalized values (weights: Fisher `F`, `F * scale^2`, or none),
   or the uniform grid; one codebook per layer or per KV head;
4. Q-Norm (a, b) per codebook so that dequantized calibration data keep their mean and std.
Optionally (extension beyond the paper) per-channel bit widths: per-channel codebooks at every
candidate width, their Fisher-weighted errors (F * scale^2: loss units, comparable across
channels, layers, K and V), and the widths that minimize the total error at a mean bit budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvpack.codecs.kmeans import SortedRows, assign_batched
from kvpack.codecs.nuq import PAD, NuqCodec, range_to_zero_scale
from kvpack.errors import MethodError
from kvpack.hf.models import text_config
from kvpack.methods.family import LayerActivations
from kvpack.methods.settings import MethodSettings

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


def _qnorm(u: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(a, b) [G, 2] with mean/std of a * levels[assign(u)] + b equal to those of u, per row of u [G, n]
    (w [G, n] in {0, 1}: which elements count)."""
    stored = levels.to(torch.float16).float()
    q = stored.gather(-1, assign_batched(u, stored)).double()
    u, w = u.double(), w.double()
    count = w.sum(-1).clamp_min(1)
    m1, m2 = (w * u).sum(-1) / count, (w * q).sum(-1) / count
    s1 = ((w * (u - m1[:, None]) ** 2).sum(-1) / count).sqrt()
    s2 = ((w * (q - m2[:, None]) ** 2).sum(-1) / count).sqrt()
    a = torch.where(s2 > 0, s1 / s2.clamp_min(1e-30), torch.ones_like(s1))
    return torch.stack([a, m1 - m2 * a], -1).float()


def _groups(codebook: str, heads: int, dim: int) -> int:
    return {"layer": 1, "head": heads, "channel": heads * dim}[codebook]


@dataclass
class Prepared:
    """Normalized calibration data of one layer's K or V, laid out by codebook group."""

    common: dict  # NuqCodec arguments shared by every fitted variant
    u: torch.Tensor  # [G, n] normalized values, clamped to [-1, 1]
    keep: torch.Tensor  # [G, n] 1.0 off the outliers
    weights: torch.Tensor  # [G, n] k-means weights (zero on outliers)
    loss_weights: torch.Tensor | None  # [G, n] F * scale^2 (zero on outliers): error in loss units
    loss_factor: torch.Tensor | None  # [G] when loss_weights == weights * factor per group, else None


def prepare(
    x: torch.Tensor, fisher: torch.Tensor | None, axis: str, settings: MethodSettings, codebook: str,
    max_points: int | None = None, timing: dict | None = None,
) -> Prepared:
    """Thresholds and normalization of calibration blocks x [W, H, P, D] (fisher: same shape, or None)."""
    options = settings.options
    frac, scope, weighting = options.outlier_frac, options.outlier_scope, options.weighting
    heads, dim = x.shape[1], x.shape[-1]
    timing = timing if timing is not None else {}
    start = time.perf_counter()
    state = _channel_ranges(x, frac, scope) if axis == "channel" else _token_thresholds(x, frac, scope)
    common = dict(axis=axis, heads=heads, head_dim=dim, outlier_frac=frac, span=options.value_span, outlier_scope=scope, **state)
    probe = NuqCodec(torch.linspace(-1, 1, 1 << settings.bits).expand(_groups(codebook, heads, dim), -1), **common)
    u, mask, _, scale = probe.normalize(x)
    keep = probe.to_groups(~mask if mask is not None else torch.ones_like(u, dtype=torch.bool)).float()
    ug = probe.to_groups(u.clamp(-1, 1))
    del u
    if weighting in ("fisher", "fisher-s2") and fisher is None:
        raise MethodError(f"'{settings.name}': Fisher weighting needs Fisher information; collect with fisher=True.")
    loss = None if fisher is None else probe.to_groups(fisher * scale.expand_as(fisher) ** 2) * keep
    if weighting == "fisher-s2":
        weights = loss
    elif weighting == "fisher":
        weights = probe.to_groups(fisher) * keep
    else:
        weights = keep
    factor = None
    if loss is not None and weighting == "fisher-s2":
        factor = torch.ones(ug.shape[0], dtype=torch.float64)
    elif loss is not None and weighting == "fisher" and axis == "channel" and codebook == "channel":
        factor = scale.reshape(-1).double() ** 2  # one scale per channel: F * s^2 = F * const
    if max_points is not None and ug.shape[1] > max_points:  # a fixed random subset of every group
        idx = torch.randperm(ug.shape[1], generator=torch.Generator().manual_seed(0))[:max_points]
        ug, keep, weights = ug[:, idx], keep[:, idx], weights[:, idx]
        loss = None if loss is None else loss[:, idx]
    timing["thresholds"] = timing.get("thresholds", 0.0) + time.perf_counter() - start
    return Prepared(common, ug, keep, weights, loss, factor)


def _fit_levels(prep: Prepared, sorted_rows: SortedRows | None, bits: int, weighting: str, need_error: bool = True):
    """(levels [G, 2**bits], loss-weighted error [G] or None) at one bit width."""
    k = 1 << bits
    if weighting == "uniform":
        levels, error = torch.linspace(-1, 1, k).expand(prep.u.shape[0], -1).clone() if k > 1 else torch.zeros(prep.u.shape[0], 1), None
    else:
        levels, error = sorted_rows.lloyd(k)
    if prep.loss_weights is None or not need_error:
        error = None
    elif prep.loss_factor is not None and error is not None:
        error = error * prep.loss_factor
    else:
        stored = levels.to(torch.float16).float()
        q = stored.gather(-1, assign_batched(prep.u, stored))
        error = (prep.loss_weights.double() * (prep.u - q).double() ** 2).sum(-1)
    return levels, error


def fit_nuq(
    x: torch.Tensor, fisher: torch.Tensor | None, axis: str, settings: MethodSettings, max_points: int | None = None,
    timing: dict | None = None,
) -> NuqCodec:
    """A fitted NuqCodec (one bit width) for calibration blocks x [W, H, P, D] (fisher: same shape, or None)."""
    timing = timing if timing is not None else {}
    options = settings.options
    prep = prepare(x, fisher, axis, settings, options.codebook, max_points, timing)
    start = time.perf_counter()
    rows = None if options.weighting == "uniform" else SortedRows(prep.u, prep.weights)
    levels, _ = _fit_levels(prep, rows, settings.bits, options.weighting, need_error=False)
    qnorm = _qnorm(prep.u, prep.keep, levels) if options.qnorm else None
    timing["kmeans"] = timing.get("kmeans", 0.0) + time.perf_counter() - start
    return NuqCodec(levels, **prep.common, qnorm=qnorm)


@dataclass
class Ladder:
    """Per-channel codebooks and their loss-weighted errors at every candidate bit width."""

    common: dict
    widths: list[int]
    levels: dict[int, torch.Tensor]  # width -> [C, 2**width]
    qnorm: dict[int, torch.Tensor]  # width -> [C, 2] (empty without Q-Norm)
    error: torch.Tensor  # [C, len(widths)] float64


def ladder(
    x: torch.Tensor, fisher: torch.Tensor | None, axis: str, settings: MethodSettings, widths: list[int],
    max_points: int | None = None, timing: dict | None = None, codebook: str = "channel",
) -> Ladder:
    """Codebooks (one per channel, or per `codebook` group) of every width in `widths` for calibration
    blocks x [W, H, P, D], with their loss-weighted errors [groups, len(widths)]."""
    timing = timing if timing is not None else {}
    if fisher is None:
        raise MethodError(f"'{settings.name}': bit allocation weighs errors by Fisher information; collect with fisher=True.")
    prep = prepare(x, fisher, axis, settings, codebook, max_points, timing)
    start = time.perf_counter()
    weighting = settings.options.weighting
    rows = None if weighting == "uniform" else SortedRows(prep.u, prep.weights)
    levels, qnorm, errors = {}, {}, []
    for b in widths:
        levels[b], error = _fit_levels(prep, rows, b, weighting)
        errors.append(error)
        if settings.options.qnorm and b > 0:
            qnorm[b] = _qnorm(prep.u, prep.keep, levels[b])
    timing["kmeans"] = timing.get("kmeans", 0.0) + time.perf_counter() - start
    return Ladder(prep.common, widths, levels, qnorm, torch.stack(errors, -1))


def allocate_bits(error: torch.Tensor, widths: list[int], mean_bits: float, tokens: int = 0,
                  tensor_channels: int | None = None, multiple: int = 1) -> torch.Tensor:
    """Per-channel widths [C] from `widths` minimizing sum_c error[c, width_c] within a bit budget.

    error [C, len(widths)] (widths consecutive integers). Marginal gains are made non-increasing per
    channel (the convex hull of a channel's error curve); the greedy then takes the steps with the
    largest gain per bit, which is optimal for convex curves.
    - tokens = 0: a step costs one bit; the budget is a mean width of exactly `mean_bits`.
    - tokens = T > 0: the budget is what T tokens of codes at `mean_bits` cost, and each channel's
      fp16 codebook (2**width entries) is paid from it: a step from w to w + 1 costs T code bits plus
      16 * 2**w codebook bits. The layout then stores at most `mean_bits` per element at T tokens,
      codebooks included.
    - multiple = m: within each tensor (consecutive blocks of `tensor_channels` channels) the number
      of channels at every width is a multiple of m (the kernels read 8 codes at a time from byte
      boundaries), by moving the channels that gain least down one width, from the widest down.
    """
    channels = error.shape[0]
    gains = (error[:, :-1] - error[:, 1:]).clamp_min(0)
    gains = torch.cummin(gains, dim=1).values  # each extra bit gains no more than the previous one
    if not widths[0] <= mean_bits <= widths[-1]:
        raise ValueError(f"mean width {mean_bits} is outside {widths[0]}..{widths[-1]}")
    step_from = torch.tensor(widths[:-1], dtype=torch.float64).expand_as(gains)
    if tokens:
        cost = tokens + 16.0 * 2.0 ** step_from
        budget = channels * tokens * (mean_bits - widths[0]) - channels * 16.0 * 2.0 ** widths[0]
    else:
        cost = torch.ones_like(gains)
        budget = round(channels * (mean_bits - widths[0]))
    # Ties broken towards lower widths (stable order of the flattened gains).
    order = torch.argsort(-(gains / cost).flatten(), stable=True)
    taken = order[torch.cumsum(cost.flatten()[order], 0) <= budget + 1e-6]
    chosen = torch.zeros(gains.numel(), dtype=torch.int64)
    chosen[taken] = 1
    bits = widths[0] + chosen.view_as(gains).sum(1)
    if multiple > 1:
        bits = _round_counts(bits, gains, widths, tensor_channels or channels, multiple)
    return bits


def _round_counts(bits: torch.Tensor, gains: torch.Tensor, widths: list[int], per_tensor: int, multiple: int) -> torch.Tensor:
    """`bits` with, in every tensor, a multiple of `multiple` channels at each width (see allocate_bits)."""
    if per_tensor % multiple:
        raise ValueError(f"{per_tensor} channels per tensor cannot be split in multiples of {multiple}")
    bits = bits.clone()
    for start in range(0, bits.numel(), per_tensor):
        part, gain = bits[start:start + per_tensor], gains[start:start + per_tensor]
        for w in range(widths[-1], widths[0], -1):
            members = (part == w).nonzero().flatten()
            extra = members.numel() % multiple
            if extra:
                last_step = gain[members, w - widths[0] - 1]  # what the step up to w gained
                part[members[torch.argsort(last_step, stable=True)[:extra]]] = w - 1
    return bits


def _from_ladder(lad: Ladder, bits: torch.Tensor) -> NuqCodec:
    top = int(bits.max())
    size = 1 << top
    levels = torch.full((bits.numel(), size), PAD)
    qnorm = torch.zeros(bits.numel(), 2) if lad.qnorm else None
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        levels[rows, : 1 << b] = lad.levels[b][rows]
        if qnorm is not None:
            qnorm[rows] = lad.qnorm[b][rows] if b in lad.qnorm else torch.tensor([1.0, 0.0])
    return NuqCodec(levels, **lad.common, qnorm=qnorm, channel_bits=bits)


def _from_rung(lad: Ladder, width: int) -> NuqCodec:
    """The codec of one tensor at one width of its ladder (alloc="layer": one width, shared codebooks)."""
    return NuqCodec(lad.levels[width], **lad.common, qnorm=lad.qnorm.get(width))


def candidate_widths(bits: int, settings: MethodSettings) -> list[int]:
    """Widths allocation chooses from: min_bits .. bits + 4 per channel; per tensor (alloc="layer")
    min_bits .. bits + 2 and at least 1 (a whole tensor at 0 bits would drop a layer's keys or values)."""
    low = settings.options.min_bits
    if settings.options.alloc == "layer":
        return list(range(max(low, 1), min(8, bits + 2) + 1))
    return list(range(low, min(8, bits + 4) + 1))


def _check_equal_sizes(activations: list[LayerActivations]) -> None:
    """Tensor-level allocation averages widths over tensors: every layer's K and V must hold as many elements."""
    dims = {a.keys.shape[-1] for a in activations} | {a.values.shape[-1] for a in activations}
    if len(dims) > 1:
        raise MethodError(f"alloc-layer needs one head_dim for every layer's keys and values (got {sorted(dims)}); "
                          "use alloc-none or alloc-tensor.")


def fit_kvquant_recipe(
    model, activations: list[LayerActivations], settings: MethodSettings, progress: bool = True,
    max_points: int | None = None,
) -> tuple[list[NuqCodec], list[NuqCodec], dict]:
    """Fit per-layer key and value NuqCodecs; returns (key_codecs, value_codecs, info with timings).

    With `options.alloc` = "tensor" or "global", channels get bit widths by Fisher-weighted error
    (mean `settings.bits` per layer's K or V, or over the whole model) instead of one width; with
    "layer", each layer's K and each layer's V get one width (and their usual shared codebook),
    chosen the same way with mean `settings.bits` over the model: every tensor stays a plain
    one-width NuqCodec, so the cache and the kernels read it as any other.
    """
    if settings.family != "kvquant":
        raise MethodError(f"fit_kvquant_recipe fits kvquant-* methods, not '{settings.name}'.")
    cfg = text_config(model.config)
    num_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    timing: dict[str, float] = {}
    alloc = settings.options.alloc
    widths = candidate_widths(settings.bits, settings)
    if alloc == "layer":
        _check_equal_sizes(activations)
    codebook = settings.options.codebook if alloc == "layer" else "channel"
    fitted = []
    for layer in tqdm(activations, desc=f"fitting {settings.name}", unit="layer", disable=not progress):
        pair = []
        for rows, fisher, axis in ((layer.keys, layer.key_fisher, settings.key_axis),
                                   (layer.values, layer.value_fisher, settings.value_axis)):
            x = blocks(rows, layer.heads, num_heads)
            f = None if fisher is None else blocks(fisher, layer.heads, num_heads)
            if alloc == "none":
                pair.append(fit_nuq(x, f, axis, settings, max_points, timing))
            else:
                pair.append(ladder(x, f, axis, settings, widths, max_points, timing, codebook))
        fitted.append(pair)
    info: dict = {"timing_s": timing}
    if alloc != "none":
        start = time.perf_counter()
        ladders = [lad for pair in fitted for lad in pair]
        if alloc == "layer":  # one error per tensor: the sum over its codebook groups
            chosen = allocate_bits(torch.stack([lad.error.sum(0) for lad in ladders]), widths, settings.bits)
            codecs = [_from_rung(lad, int(b)) for lad, b in zip(ladders, chosen)]
        else:
            budget = dict(tokens=settings.options.budget_tokens, multiple=8)
            if alloc == "global":
                sizes = [lad.error.shape[0] for lad in ladders]
                bits = allocate_bits(torch.cat([lad.error for lad in ladders]), widths, settings.bits,
                                     tensor_channels=sizes[0] if len(set(sizes)) == 1 else None, **budget).split(sizes)
            else:
                bits = [allocate_bits(lad.error, widths, settings.bits, **budget) for lad in ladders]
            codecs = [_from_ladder(lad, b) for lad, b in zip(ladders, bits)]
        fitted = [codecs[i : i + 2] for i in range(0, len(codecs), 2)]
        timing["allocation"] = time.perf_counter() - start
        info["mean_bits"] = {"keys": [c.mean_bits for c, _ in fitted], "values": [c.mean_bits for _, c in fitted]}
    return [k for k, _ in fitted], [v for _, v in fitted], info
