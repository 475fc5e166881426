"""TurboQuant (Zandieh et al. 2025): norm + random rotation + Lloyd-Max scalar codes, no calibration.

Per head vector x [head_dim = d]:
1. keep n = ||x|| (fp16) and rotate the unit vector: y = R (x / n), R a seeded random orthogonal
   map (`codecs.rotation`: randomized Hadamard for power-of-two d, else a dense Haar matrix);
2. every coordinate of y follows the same known law (a unit-sphere coordinate, ~N(0, 1/d)), so
   each is replaced by the nearest level of the Lloyd-Max codebook of that law (`codecs.lloyd_max`);
3. fractional widths b + f (0 < f < 1): the first ceil(f * d) rotated coordinates get b + 1 bits,
   the rest b bits (after the rotation all coordinates are alike, so which ones does not matter):
   2.5 bits = half at 3, half at 2; 3.5 bits = half at 4, half at 3.
4. optional QJL residual sketch (`qjl=True`, the paper's TurboQuant-prod, meant for keys): the MSE
   stage gets `bits - 1` bits and the residual r = n y - n' y_hat (in the rotated frame) is stored
   as m = d sign bits sign(S r) with a seeded Gaussian S [m, d], plus ||r|| (fp16). The decoded
   residual sqrt(pi/2) / m * ||r|| * S^T sign(S r) makes q . k_hat an unbiased estimate of q . k
   over the draw of S (it usually raises the squared error of k_hat).
5. `rescale=True` (not in the paper) stores n / ||y_hat|| instead of n, so decoded vectors keep
   their norm (Lloyd-Max levels shrink vectors by about 1 - distortion).
6. `center` (not in the paper; calibrated): a fixed vector per KV head [heads, head_dim]
   subtracted before step 1 and added back after decoding, e.g. the mean key of each head, so the
   norm and the codes describe the deviation from it. Blocks must then be [..., heads, tokens, d].

Stored per vector: the packed codes (b or b + 1 bits per coordinate), the fp16 norm and, with QJL,
d sign bits and the fp16 residual norm. Shared per layer (`shared_nbytes`): the rotation (d sign
bits, or the fp32 matrix), the fp32 codebooks and the fp16 sketch matrix S.

`head_dim=None` makes an unbound codec (what the `turboquant` family builds, not knowing the
model): it builds the parts above from its seed for each head_dim it meets (`bind`), always the
same ones, and its saved state is the seed alone.
"""
from __future__ import annotations

import copy
import math

import torch

from kvpack.codecs import packing
from kvpack.codecs.base import Codec, Encoded, StorageLayout, register_codec, token_range
from kvpack.codecs.lloyd_max import lloyd_max_levels
from kvpack.codecs.rotation import Rotation
from kvpack.errors import NonFiniteError

MAX_BITS = 8


def split_widths(bits: float, dim: int) -> tuple[int, int, int]:
    """(high width, number of high-width coordinates, low width) for `bits` per coordinate over `dim`."""
    low = math.floor(bits + 1e-9)
    high_count = math.ceil((bits - low) * dim - 1e-6)
    return low + 1, min(max(high_count, 0), dim), low


def _bucketize(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of sorted `levels` [n] for every element of y."""
    if levels.numel() == 1:
        return torch.zeros(y.shape, dtype=torch.int64, device=y.device)
    return torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)


@register_codec
class TurboQuantCodec(Codec):
    """TurboQuant codes of head vectors [..., tokens, head_dim]; see the module docstring."""

    def __init__(
        self,
        bits: float,
        head_dim: int | None = None,
        seed: int = 0,
        qjl: bool = False,
        rescale: bool = False,
        signs: torch.Tensor | None = None,
        matrix: torch.Tensor | None = None,
        sketch: torch.Tensor | None = None,
        levels: dict[int, torch.Tensor] | None = None,
        center: torch.Tensor | None = None,
        name: str | None = None,
    ):
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
            raise ValueError(f"TurboQuant bit width must be a finite number, got {bits!r}")
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"TurboQuant bit width must be in 1..{MAX_BITS} bits per coordinate, got {bits!r}")
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2):
            raise ValueError(f"head_dim must be an integer >= 2, got {head_dim!r}")
        self.bits, self.head_dim, self.seed = float(bits), head_dim, int(seed)
        self.qjl, self.rescale = bool(qjl), bool(rescale)
        self.mse_bits = self.bits - (1.0 if self.qjl else 0.0)
        self.name = name or f"turboquant{self.bits:g}" + ("-qjl" if self.qjl else "") + ("-rescale" if self.rescale else "")
        self._bound: dict[int, TurboQuantCodec] = {}
        self.center = None
        if head_dim is None:  # unbound: parts are built from the seed for each head_dim met (see `bind`)
            if center is not None:
                raise ValueError("a TurboQuant center needs the codec built for one head_dim")
            return
        if center is not None:
            center = torch.as_tensor(center).to(torch.float16).float()
            if center.dim() != 2 or center.shape[-1] != head_dim or not torch.isfinite(center).all():
                raise ValueError(f"center must be finite [heads, {head_dim}], got shape {tuple(center.shape)}")
            self.center = center
        self.high, self.high_count, self.low = split_widths(self.mse_bits, head_dim)
        self.rotation = Rotation(head_dim, seed, signs=signs, matrix=matrix)
        widths = {w for w, n in ((self.high, self.high_count), (self.low, head_dim - self.high_count)) if n > 0}
        given = levels or {}
        self.levels = {}
        for w in sorted(widths):
            table = given[w] if w in given else lloyd_max_levels(w, head_dim)
            self.levels[w] = torch.as_tensor(table).float().flatten().sort().values
        for w, lv in self.levels.items():
            if lv.shape != (1 << w,):
                raise ValueError(f"a {w}-bit codebook needs {1 << w} levels, got shape {tuple(lv.shape)}")
        self.sketch = None
        if self.qjl:
            if sketch is None:
                gen = torch.Generator().manual_seed(self.seed + 0x9E3779B1)
                sketch = torch.randn(head_dim, head_dim, generator=gen)
            self.sketch = torch.as_tensor(sketch).to(torch.float16).float().reshape(head_dim, head_dim)

    def bind(self, head_dim: int) -> "TurboQuantCodec":
        """The codec for vectors of `head_dim`: this one if built for it, else one built from the same seed
        (the same rotation, codebooks and sketch every time: families that do not know the model use this)."""
        if self.head_dim is not None:
            if head_dim != self.head_dim:
                raise ValueError(f"TurboQuant codec built for head_dim {self.head_dim} got vectors of {head_dim}")
            return self
        if head_dim not in self._bound:
            self._bound[head_dim] = TurboQuantCodec(self.bits, head_dim, self.seed, self.qjl, self.rescale, name=self.name)
        return self._bound[head_dim]

    # ----- state (recipes) -----
    def config(self) -> dict:
        return {"bits": self.bits, "head_dim": self.head_dim, "seed": self.seed, "qjl": self.qjl,
                "rescale": self.rescale, "name": self.name}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Config plus, for a codec built for one head_dim, its rotation, codebooks and sketch."""
        if self.head_dim is None:
            return self.config(), {}
        tensors = dict(self.rotation.tensors())
        tensors.update({f"levels{w}": lv for w, lv in self.levels.items()})
        if self.sketch is not None:
            tensors["sketch"] = self.sketch.half()
        if self.center is not None:
            tensors["center"] = self.center.half()
        return self.config(), tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "TurboQuantCodec":
        levels = {int(k[len("levels"):]): v for k, v in tensors.items() if k.startswith("levels")}
        return cls(signs=tensors.get("signs"), matrix=tensors.get("matrix"), sketch=tensors.get("sketch"),
                   levels=levels, center=tensors.get("center"), **config)

    def layout(self) -> StorageLayout:
        if self.head_dim is None:  # every part a head_dim may produce
            names = ["codes_hi", "codes_lo", "norm"] + (["sketch_bits", "residual_norm"] if self.qjl else [])
            return StorageLayout({n: "scales" if "norm" in n else "codes" for n in names})
        parts = {name: "codes" for name, _, _ in self._parts()} | {"norm": "scales"}
        if self.qjl:
            parts |= {"sketch_bits": "codes", "residual_norm": "scales"}
        return StorageLayout(parts)

    @property
    def device(self) -> torch.device:
        if self.head_dim is None:
            return next((c.device for c in self._bound.values()), torch.device("cpu"))
        return next(iter(self.rotation.tensors().values())).device

    def to(self, device: torch.device | str) -> "TurboQuantCodec":
        """This codec with its rotation, codebooks and sketch on `device` (a new object when anything moves)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = copy.copy(self)
        if self.head_dim is None:
            moved._bound = {d: c.to(device) for d, c in self._bound.items()}
            return moved
        moved.rotation = self.rotation.to(device)
        moved.levels = {w: lv.to(device) for w, lv in self.levels.items()}
        moved.sketch = None if self.sketch is None else self.sketch.to(device)
        moved.center = None if self.center is None else self.center.to(device)
        return moved

    def shared_nbytes(self) -> int:
        """Rotation (1 bit per sign or the fp32 matrix), fp32 codebooks, fp16 sketch matrix and center (of every head_dim
        met so far when unbound)."""
        if self.head_dim is None:
            return sum(c.shared_nbytes() for c in self._bound.values())
        books = sum(lv.numel() * 4 for lv in self.levels.values())
        extra = sum(0 if t is None else t.numel() * 2 for t in (self.sketch, self.center))
        return self.rotation.nbytes() + books + extra

    # ----- codec interface -----
    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"TurboQuant codec built for head_dim {self.head_dim} got a block of shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise NonFiniteError("TurboQuant input contains NaN or inf; the cache would be silently corrupted.")

    def _parts(self) -> list[tuple[str, int, slice]]:
        """(tensor name, width, coordinate slice) of the coded coordinate groups."""
        k, d = self.high_count, self.head_dim
        parts = [("codes_hi", self.high, slice(0, k)), ("codes_lo", self.low, slice(k, d))]
        return [(n, w, s) for n, w, s in parts if s.stop > s.start and w > 0]

    def _dequantize(self, codes: dict[str, torch.Tensor], shape: tuple[int, ...], device) -> torch.Tensor:
        y = torch.zeros(*shape, dtype=torch.float32, device=device)
        for name, width, cols in self._parts():
            y[..., cols] = self.levels[width].to(device)[codes[name]]
        return y

    def encode(self, x: torch.Tensor) -> Encoded:
        """x [..., tokens, head_dim] -> codes [..., tokens, bytes] per width, norm fp16 [..., tokens, 1] (+ sketch)."""
        if self.head_dim is None:
            return self.bind(x.shape[-1]).encode(x)
        self._check(x)
        x = x.float()
        if self.center is not None:
            x = x - self._center(x.shape, x.device)
        norm = x.norm(dim=-1, keepdim=True)
        y = self.rotation.rotate(x / norm.clamp_min(torch.finfo(torch.float32).tiny))
        tensors, codes = {}, {}
        for name, width, cols in self._parts():
            codes[name] = _bucketize(y[..., cols].contiguous(), self.levels[width].to(y.device))
            tensors[name] = packing.pack_channels(codes[name], width)
        y_hat = self._dequantize(codes, y.shape, y.device)
        stored = norm
        if self.rescale:
            length = y_hat.norm(dim=-1, keepdim=True)
            stored = torch.where(length > 0, norm / length.clamp_min(1e-30), norm)
        tensors["norm"] = stored.to(torch.float16)
        if self.qjl:
            residual = y * norm - y_hat * tensors["norm"].float()  # [..., T, d], rotated frame
            signs = (residual @ self.sketch.to(x.device).T) >= 0
            tensors["sketch_bits"] = packing.pack_channels(signs.to(torch.int32), 1)
            tensors["residual_norm"] = residual.norm(dim=-1, keepdim=True).to(torch.float16)
        return Encoded(tensors, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Packed storage -> float32 [..., tokens, head_dim]."""
        if self.head_dim is None:
            return self.bind(enc.shape[-1]).decode(enc)
        t, shape = enc.tensors, enc.shape
        device = t["norm"].device
        codes = {name: packing.unpack_channels(t[name], width, cols.stop - cols.start) for name, width, cols in self._parts()}
        y = self._dequantize(codes, shape, device) * t["norm"].float()
        if self.qjl:
            signs = packing.unpack_channels(t["sketch_bits"], 1, self.head_dim).float() * 2 - 1
            m = self.sketch.shape[0]
            y = y + math.sqrt(math.pi / 2) / m * t["residual_norm"].float() * (signs @ self.sketch.to(device))
        x = self.rotation.unrotate(y)
        return x if self.center is None else x + self._center(shape, device)

    def _center(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """The center broadcast to blocks of `shape` [..., heads, tokens, head_dim]."""
        if len(shape) < 3 or shape[-3] != self.center.shape[0]:
            raise ValueError(f"TurboQuant center for {self.center.shape[0]} heads got a block of shape {tuple(shape)}")
        return self.center.to(device)[:, None, :]

    def slice_tokens(self, enc: Encoded, start: int, stop: int) -> Encoded:
        """Tokens start..stop-1 of a block: every stored tensor holds one row per token [..., tokens, n]."""
        shape = token_range(enc.shape, start, stop)
        return Encoded({n: t[..., start:stop, :] for n, t in enc.tensors.items()}, shape)

    def bits_formula(self) -> float:
        """Stored bits per element of one block by arithmetic (what `Encoded.bits_per_element` measures
        when every vector's code groups fill whole bytes)."""
        if self.head_dim is None:
            raise ValueError("an unbound TurboQuant codec has no bit count yet: use bind(head_dim)")
        d = self.head_dim
        bits = self.high * self.high_count + self.low * (d - self.high_count) + 16
        if self.qjl:
            bits += d + 16
        return bits / d
