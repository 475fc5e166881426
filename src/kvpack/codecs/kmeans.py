"""Weighted 1-D k-means (Lloyd), exact and vectorized, for one or many independent data sets.

In one dimension every cluster of the optimal assignment is a contiguous run of the sorted
points, so after one sort each Lloyd step is a `searchsorted` of the midpoints plus prefix sums:
O(k log n) per iteration instead of O(n k). Rows of a [groups, n] batch are clustered
independently in the same tensor operations (one codebook per channel costs one sort).
Initialization is deterministic (weighted quantiles), so the same data give the same codebook.
"""
from __future__ import annotations

import torch


def _check_weights(x: torch.Tensor, weights: torch.Tensor | None) -> None:
    if weights is None:
        return
    if weights.shape != x.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match points {tuple(x.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("k-means weights must be finite and non-negative")


class SortedRows:
    """Rows of x [groups, n] sorted once, with weighted prefix sums, for Lloyd runs at several k."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor | None = None):
        if x.dim() != 2:
            raise ValueError(f"batched k-means needs x [groups, n], got {tuple(x.shape)}")
        _check_weights(x, weights)
        x = x.detach().float()
        w = torch.ones_like(x) if weights is None else weights.detach().float()
        finite = torch.isfinite(x)
        x, w = x.where(finite, 0.0), w.where(finite, 0.0)
        xs, order = x.sort(-1)
        ws = w.gather(-1, order).double()
        del order
        self.xs = xs.double()
        groups, self.n = xs.shape
        zero = torch.zeros(groups, 1, dtype=torch.float64)
        self.w_cum = torch.cat([zero, ws.cumsum(-1)], -1)  # [G, n + 1]
        self.wx_cum = torch.cat([zero, (ws * self.xs).cumsum(-1)], -1)
        self.wxx_cum = torch.cat([zero, (ws * self.xs * self.xs).cumsum(-1)], -1)
        self.lo = x.where(finite, float("inf")).amin(-1).double()
        self.hi = x.where(finite, float("-inf")).amax(-1).double()

    def _sums(self, bounds: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
        return cum.gather(-1, bounds[:, 1:]) - cum.gather(-1, bounds[:, :-1])

    def _bounds(self, centroids: torch.Tensor) -> torch.Tensor:
        groups = centroids.shape[0]
        mid = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        starts = torch.zeros(groups, 1, dtype=torch.long)
        ends = torch.full((groups, 1), self.n, dtype=torch.long)
        # Cluster j of row g holds the sorted points [bounds[g, j], bounds[g, j + 1]).
        return torch.cat([starts, torch.searchsorted(self.xs, mid, right=True), ends], -1)

    def lloyd(self, k: int, iters: int = 100, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids [G, k] float32 sorted, weighted squared error [G] float64) of every row."""
        if k < 1:
            raise ValueError(f"k-means needs k >= 1, got {k}")
        total = self.w_cum[:, -1:]
        targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * total
        idx = torch.searchsorted(self.w_cum[:, 1:].contiguous(), targets.contiguous()).clamp_(0, max(self.n - 1, 0))
        centroids = self.xs.gather(-1, idx)
        empty = total[:, 0] <= 0
        if bool(empty.any()):  # rows without weight: levels spread over the finite range
            lo, hi = self.lo.where(torch.isfinite(self.lo), 0.0), self.hi.where(torch.isfinite(self.hi), 0.0)
            spread = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, k, dtype=torch.float64)
            centroids = torch.where(empty[:, None], spread, centroids)
        span = float((self.xs[:, -1] - self.xs[:, 0]).abs().max()) if self.n else 0.0
        for _ in range(iters):
            bounds = self._bounds(centroids)
            mass, moment = self._sums(bounds, self.w_cum), self._sums(bounds, self.wx_cum)
            new = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids).sort(-1).values
            shift = float((new - centroids).abs().max())
            centroids = new
            if shift <= tol * max(span, 1e-12):
                break
        bounds = self._bounds(centroids)
        mass, moment, second = (self._sums(bounds, c) for c in (self.w_cum, self.wx_cum, self.wxx_cum))
        error = (second - 2 * centroids * moment + centroids**2 * mass).sum(-1).clamp_min(0)
        return centroids.float(), error


def weighted_kmeans_1d_batched(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Centroids [groups, k] (each row sorted, float32) of the rows of x [groups, n].

    Row g minimizes sum_i w[g, i] (x[g, i] - c_g(x[g, i]))^2. Points with zero weight (or non-finite
    values) do not count: give masked points weight 0. Empty clusters keep their centroid; a row
    without any weight gets k levels spread evenly over its finite range.
    """
    return SortedRows(x, weights).lloyd(k, iters, tol)[0]


def weighted_kmeans_1d(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Centroids [k] (sorted ascending, float32) minimizing sum_i w_i (x_i - c(x_i))^2 over x [n].

    weights [n] >= 0 (None: all 1); zero-weight points do not pull centroids. If there are fewer
    distinct points than k, surplus centroids duplicate existing ones (still a valid codebook).
    """
    x = x.detach().flatten()
    w = None if weights is None else weights.detach().flatten()
    _check_weights(x, w)
    keep = torch.isfinite(x) if w is None else torch.isfinite(x) & (w > 0)
    if not bool(keep.any()):
        raise ValueError("k-means got no points with positive weight")
    if not bool(keep.all()):
        x, w = x[keep], None if w is None else w[keep]
    return weighted_kmeans_1d_batched(x[None], k, None if w is None else w[None], iters, tol)[0]


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` [k] for every element of x (int64)."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(x, mid.to(x.dtype), right=False)


def assign_batched(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid indices for the rows of x [groups, n], row g against centroids[g] (sorted)."""
    mid = ((centroids[:, 1:] + centroids[:, :-1]) / 2).to(x.dtype).contiguous()
    return torch.searchsorted(mid, x.contiguous(), right=False)
