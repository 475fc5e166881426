"""Weighted 1-D k-means (Lloyd), exact and vectorized.

In one dimension every cluster of the optimal assignment is a contiguous run of the sorted
points, so after one sort each Lloyd step is a `searchsorted` of the midpoints plus prefix sums:
O(k log n) per iteration instead of O(n k). Initialization is deterministic (weighted quantiles),
so the same data always gives the same codebook.
"""
from __future__ import annotations

import torch


def weighted_quantiles(x_sorted: torch.Tensor, w_cum: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weighted quantiles q [k] in [0, 1] of sorted points x_sorted [n] with cumulative weights w_cum [n]."""
    total = w_cum[-1]
    idx = torch.searchsorted(w_cum, (q.to(w_cum.dtype) * total).contiguous())
    return x_sorted[idx.clamp_(0, x_sorted.numel() - 1)]


def weighted_kmeans_1d(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Centroids [k] (sorted ascending, float32) minimizing sum_i w_i (x_i - c(x_i))^2.

    x [n]: points; weights [n] >= 0 (None: all 1). Points with zero weight do not pull centroids.
    Clusters that end up empty keep their previous centroid. If there are fewer distinct points
    than k, the surplus centroids duplicate existing ones (still a valid codebook).
    """
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    x = x.detach().flatten().double()
    if weights is None:
        w = torch.ones_like(x)
    else:
        w = weights.detach().flatten().double()
        if w.shape != x.shape:
            raise ValueError(f"weights {tuple(w.shape)} do not match points {tuple(x.shape)}")
        if (w < 0).any() or not torch.isfinite(w).all():
            raise ValueError("k-means weights must be finite and non-negative")
    keep = torch.isfinite(x) & (w > 0)
    x, w = x[keep], w[keep]
    if x.numel() == 0:
        raise ValueError("k-means got no points with positive weight")
    order = torch.argsort(x)
    x, w = x[order], w[order]
    w_cum = torch.cumsum(w, 0)
    wx_cum = torch.cumsum(w * x, 0)
    zero = torch.zeros(1, dtype=torch.float64)
    w_cum0, wx_cum0 = torch.cat([zero, w_cum]), torch.cat([zero, wx_cum])

    centroids = weighted_quantiles(x, w_cum, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        mid = (centroids[1:] + centroids[:-1]) / 2
        # Cluster j holds the sorted points in [bounds[j], bounds[j+1]).
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(x, mid, right=True),
                            torch.tensor([x.numel()])])
        mass = w_cum0[bounds[1:]] - w_cum0[bounds[:-1]]
        moment = wx_cum0[bounds[1:]] - wx_cum0[bounds[:-1]]
        new = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids).sort().values
        shift = (new - centroids).abs().max()
        centroids = new
        if shift <= tol * max(float((x[-1] - x[0]).abs()), 1e-12):
            break
    return centroids.float()


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` [k] for every element of x (int64)."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(x, mid.to(x.dtype), right=False)
