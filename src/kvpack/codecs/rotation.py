"""Seeded random orthogonal rotations of head vectors, reproducible from their saved tensors.

- Power-of-two head_dim: a randomized Hadamard transform R x = H (s * x) / sqrt(d), with random
  signs s (from the seed) and the fast Walsh-Hadamard transform H (d log d adds, no matrix).
  Stored: the d signs (1 bit each).
- Any other head_dim: a dense random orthogonal matrix Q (QR of a seeded Gaussian matrix with the
  signs of R's diagonal folded in, i.e. Haar-distributed). Stored: Q, fp32 [d, d].

`rotate` maps x [..., d] to R x and `unrotate` applies R^T; both are exact inverses up to float
rounding, and inner products are preserved: (R q) . (R k) = q . k.
"""
from __future__ import annotations

import math

import torch


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of x [..., d] along the last dim (d a power of two)."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.view(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, d)
        h *= 2
    return (y / math.sqrt(d)).reshape(*lead, d)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class Rotation:
    """A seeded random orthogonal map of R^dim; see the module docstring."""

    def __init__(self, dim: int, seed: int = 0, signs: torch.Tensor | None = None, matrix: torch.Tensor | None = None):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"rotation dimension must be a positive integer, got {dim!r}")
        self.dim, self.seed = dim, int(seed)
        self.hadamard = is_power_of_two(dim)
        if self.hadamard:
            if signs is None:
                signs = torch.randint(0, 2, (dim,), generator=_generator(seed)) * 2 - 1
            self.signs = torch.as_tensor(signs).float().reshape(dim)
            if not bool((self.signs.abs() == 1).all()):
                raise ValueError("Hadamard rotation signs must all be +1 or -1")
            self.matrix = None
        else:
            if matrix is None:
                g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
                q, r = torch.linalg.qr(g)
                matrix = (q * torch.sign(torch.diagonal(r))).float()
            self.matrix = torch.as_tensor(matrix).float().reshape(dim, dim)
            self.signs = None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> R x [..., dim] (float32)."""
        x = x.float()
        if self.hadamard:
            return walsh_hadamard(x * self.signs.to(x.device))
        return x @ self.matrix.to(x.device).T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """y [..., dim] -> R^T y [..., dim] (float32)."""
        y = y.float()
        if self.hadamard:
            return walsh_hadamard(y) * self.signs.to(y.device)
        return y @ self.matrix.to(y.device)

    def as_matrix(self) -> torch.Tensor:
        """R as a dense float32 [dim, dim] matrix: rotate(x) == x @ R.T."""
        return self.rotate(torch.eye(self.dim)).T

    def to(self, device: torch.device | str) -> "Rotation":
        """This rotation with its tensor on `device` (a new object)."""
        return Rotation(self.dim, self.seed, signs=None if self.signs is None else self.signs.to(device),
                        matrix=None if self.matrix is None else self.matrix.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a recipe stores to rebuild exactly this rotation."""
        if self.hadamard:
            return {"signs": self.signs.to(torch.int8)}
        return {"matrix": self.matrix}

    def nbytes(self) -> int:
        """Bytes the rotation occupies when held: 1 bit per sign, or the fp32 matrix."""
        return (self.dim + 7) // 8 if self.hadamard else self.dim * self.dim * 4
