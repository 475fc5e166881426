"""Lloyd-Max (MSE-optimal) scalar codebooks for known distributions, computed numerically once.

Two distributions:
- `dim=None`: the standard normal N(0, 1).
- `dim=d`: one coordinate of a vector drawn uniformly from the unit sphere in R^d, density
  proportional to (1 - x^2)^((d - 3) / 2) on [-1, 1] (a Beta law, close to N(0, 1/d) for large d).
  This is the law of every coordinate of a randomly rotated unit vector.

The Lloyd iteration alternates thresholds = midpoints of levels and levels = conditional means of
their cells, with the cell masses and first moments read from cumulative tables: closed forms for
the normal law, a fine trapezoid table in theta (x = sin theta, smooth for every d >= 2) for the
sphere. No data is involved.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_GRID = 1 << 17  # trapezoid points of the sphere tables; levels are accurate to ~1e-9


def _normal_tables():
    """(W, M): CDF and partial first moment of N(0, 1) as vectorized functions of thresholds."""
    erf = np.vectorize(math.erf)

    def cdf(t: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + erf(t / math.sqrt(2.0)))

    def moment(t: np.ndarray) -> np.ndarray:
        return -np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

    return cdf, moment


def _sphere_tables(dim: int):
    """(W, M) of one coordinate of a uniform unit vector in R^dim, from tables over theta = asin(x)."""
    theta = np.linspace(-math.pi / 2, math.pi / 2, _GRID)
    x = np.sin(theta)
    dens = np.cos(theta) ** (dim - 2)  # density of theta: (1 - x^2)^((d-3)/2) dx = cos(theta)^(d-2) dtheta
    step = theta[1] - theta[0]
    w = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) * step / 2)])
    m = np.concatenate([[0.0], np.cumsum((dens[1:] * x[1:] + dens[:-1] * x[:-1]) * step / 2)])
    w, m = w / w[-1], m / w[-1]

    def cdf(t: np.ndarray) -> np.ndarray:
        return np.interp(np.arcsin(np.clip(t, -1.0, 1.0)), theta, w)

    def moment(t: np.ndarray) -> np.ndarray:
        return np.interp(np.arcsin(np.clip(t, -1.0, 1.0)), theta, m)

    return cdf, moment


def _check(bits: int, dim: int | None) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= 10:
        raise ValueError(f"Lloyd-Max bit width must be an integer in 0..10, got {bits!r}")
    if dim is not None and (not isinstance(dim, int) or dim < 2):
        raise ValueError(f"sphere dimension must be an integer >= 2, got {dim!r}")


@lru_cache(maxsize=None)
def _solve(bits: int, dim: int | None) -> tuple[tuple[float, ...], float]:
    n = 1 << bits
    cdf, moment = _normal_tables() if dim is None else _sphere_tables(dim)
    second = 1.0 if dim is None else 1.0 / dim
    if n == 1:
        return (0.0,), second
    lo, hi = (-np.inf, np.inf) if dim is None else (-1.0, 1.0)
    # start from the conditional means of equal-mass cells (quantile initialization)
    probe = np.linspace(-8, 8, 4001) if dim is None else np.linspace(-1, 1, 4001)
    edges = np.interp((np.arange(1, n)) / n, cdf(probe), probe)
    levels = None
    for _ in range(20000):
        bounds = np.concatenate([[lo], edges, [hi]])
        mass = np.diff(cdf(bounds))
        new = np.diff(moment(bounds)) / np.maximum(mass, 1e-300)
        if levels is not None and np.max(np.abs(new - levels)) < 1e-12:
            levels = new
            break
        levels = new
        edges = (levels[1:] + levels[:-1]) / 2
    levels = (levels - levels[::-1]) / 2  # the laws are symmetric: remove float asymmetry
    bounds = np.concatenate([[lo], (levels[1:] + levels[:-1]) / 2, [hi]])
    mass = np.diff(cdf(bounds))
    distortion = second - float(np.sum(mass * levels**2))  # E[(X - Q(X))^2] at the centroid condition
    return tuple(float(v) for v in levels), distortion


def lloyd_max_levels(bits: int, dim: int | None = None) -> np.ndarray:
    """Sorted float64 [2**bits] MSE-optimal levels of N(0, 1) (dim=None) or of a unit-sphere coordinate in R^dim."""
    _check(bits, dim)
    return np.array(_solve(bits, dim)[0])


def lloyd_max_distortion(bits: int, dim: int | None = None) -> float:
    """Expected squared error per coordinate E[(X - Q(X))^2] of `lloyd_max_levels(bits, dim)`."""
    _check(bits, dim)
    return _solve(bits, dim)[1]
