"""ChunkCodec: one LMCache chunk (all its groups, layers, K and V) <-> one fixed-size kvpack frame.

Every chunk of a given layout serializes to exactly `max_nbytes(layout)` bytes: the packed tensors
of every (group, layer, K/V) block, whose sizes depend only on the block shape (the sparse outliers
have a fixed capacity, see `outliers`), inside the frame of `format`. LMCache's file-system adapter
reads back exactly the bytes it allocated for the load, so a fixed size is what lets chunks
round-trip through it; it also makes `estimate_serialized_size` exact rather than a guess.
"""
from __future__ import annotations

import threading

import torch

from kvpack.codecs.base import Encoded
from kvpack.integrations.lmcache import format as frame
from kvpack.integrations.lmcache import outliers
from kvpack.integrations.lmcache.errors import ChunkFormatError, SerdeConfigError
from kvpack.integrations.lmcache.layout import GroupLayout, group_layout
from kvpack.integrations.lmcache.options import SerdeOptions
from kvpack.integrations.lmcache.recipes import StorePath, load_path
from kvpack.integrations.lmcache.rope import RopeSpec

ROLES = ("k", "v")
_PROBE_SEED = 0


class _Plan:
    """The tensor table of one (layout, path): for every block, its tensors' (name, dtype, shape) and outlier capacity."""

    def __init__(self, blocks: list[tuple[int, int, int, list[tuple[str, torch.dtype, tuple[int, ...]]], int]], positions: int):
        self.blocks = blocks  # (group, layer, role, tensors, capacity)
        self.positions = positions  # tokens whose int32 positions are stored (0: none)
        self.payload = 4 * positions + sum(
            _numel(shape) * dtype.itemsize for *_, tensors, _ in blocks for _, dtype, shape in tensors
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


class ChunkCodec:
    """Serializes LMCache KV chunks with a kvpack recipe; see the module docstring."""

    def __init__(self, options: SerdeOptions):
        self.options = options
        self.primary = load_path("primary", options.method, options.recipe)
        self.fallback = None
        if options.fallback_method or options.fallback_recipe:
            self.fallback = load_path("fallback", options.fallback_method, options.fallback_recipe)
            if self.fallback.pre_rope:
                raise SerdeConfigError(
                    f"fallback method '{self.fallback.method}' stores keys pre-RoPE; the fallback serves chunks without "
                    "positions, so it must be a post-RoPE method (e.g. 'kvquant-3bit-1pct:post-rope' or 'int4:key-channel')."
                )
        self.rope = None
        if self.primary.pre_rope:
            if options.rope_theta is None:
                raise SerdeConfigError(
                    f"method '{self.primary.method}' stores keys pre-RoPE: pass the model's rope_theta (and "
                    "partial_rotary_factor if not 1) in the serde kwargs, or use a post-RoPE method."
                )
            head_dim = self._head_dim_hint()
            if head_dim is None:
                raise SerdeConfigError("pre-RoPE storage needs head_dim: pass it in the serde kwargs")
            rot = int(head_dim * float(options.partial_rotary_factor))
            self.rope = RopeSpec(float(options.rope_theta), rot - rot % 2)
        self._plans: dict[tuple, _Plan] = {}
        self.stats: dict[str, int] = {}  # outlier bookkeeping of encode_into (see outliers.fit)
        self._lock = threading.Lock()

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "ChunkCodec":
        return cls(SerdeOptions.from_kwargs(dict(kwargs)))

    @property
    def paths(self) -> list[StorePath]:
        return [self.primary] + ([self.fallback] if self.fallback else [])

    # ----- layouts -----
    def _hint(self, option: str, fact: str, codec_attr: str) -> int | None:
        """A layout size: the serde option, else the recipes' model identity, else the first codec's attribute."""
        if getattr(self.options, option):
            return int(getattr(self.options, option))
        for path in self.paths:
            value = path.model_fact(fact) or getattr(path.codecs(0)[0], codec_attr, None)
            if value:
                return int(value)
        return None

    def _head_dim_hint(self) -> int | None:
        return self._hint("head_dim", "head_dim", "head_dim")

    def _heads_hint(self) -> int | None:
        return self._hint("num_kv_heads", "num_kv_heads", "heads")

    def layouts(self, shapes, dtypes) -> list[GroupLayout]:
        """One GroupLayout per group of an LMCache object (MemoryLayoutDesc shapes / dtypes)."""
        if len(shapes) != len(dtypes) or not shapes:
            raise SerdeConfigError(f"{len(shapes)} shapes and {len(dtypes)} dtypes: an LMCache object needs one of each per group")
        return [group_layout(s, d, self.options.layout, self._head_dim_hint(), self._heads_hint()) for s, d in zip(shapes, dtypes)]

    def _model_layers(self, layouts: list[GroupLayout], path: StorePath) -> list[list[int]]:
        """The model layer of every layer of every group."""
        if self.options.group_layers is not None:
            mapping = [list(map(int, g)) for g in self.options.group_layers]
            if len(mapping) != len(layouts) or any(len(m) != g.layers for m, g in zip(mapping, layouts)):
                raise SerdeConfigError(
                    f"group_layers lists {[len(m) for m in mapping]} layers per group, the chunk has {[g.layers for g in layouts]}"
                )
            return mapping
        start, mapping = 0, []
        for g in layouts:
            mapping.append(list(range(start, start + g.layers)))
            start += g.layers
        if not path.shared and start != path.recipe.num_layers:
            raise SerdeConfigError(
                f"the chunk holds {start} layers, recipe '{path.method}' has {path.recipe.num_layers}: pass group_layers "
                "(the model layer of each layer of each group) in the serde kwargs"
            )
        return mapping

    # ----- plans -----
    def _capacity(self, path: StorePath, shape: tuple[int, int, int], probe_nnz: int) -> int:
        """Outlier slots of a block [heads, tokens, head_dim]: the configured fraction, at least what the codec
        always stores and room for the sink tokens to stay exact."""
        fraction = self.options.outlier_capacity
        if fraction is None:
            fraction = 1.5 * path.outlier_frac
        heads, tokens, dim = shape
        sinks = min(path.sink_tokens, tokens) * heads * dim if probe_nnz or fraction else 0
        return max(outliers.capacity_for(heads * tokens * dim, float(fraction)), probe_nnz, sinks)

    @staticmethod
    def _probe(path: StorePath, codec, x: torch.Tensor):
        """(encoding of x, its outlier count) for a probe block x [heads, tokens, head_dim]."""
        try:
            enc = codec.encode(x)
        except (ValueError, RuntimeError) as exc:
            raise SerdeConfigError(
                f"{path.method} cannot encode blocks of {x.shape[0]} KV heads x {x.shape[1]} tokens x {x.shape[2]}: {exc}"
            ) from exc
        nnz = int(enc.tensors[outliers.COUNTS].to(torch.int64).sum()) if outliers.has_outliers(enc.tensors) else 0
        return enc, nnz

    def plan(self, layouts: list[GroupLayout], path: StorePath) -> _Plan:
        key = (tuple(g.describe()[0] for g in layouts), tuple(g.shape for g in layouts), path.name)
        with self._lock:
            if key in self._plans:
                return self._plans[key]
        blocks, probes = [], {}
        generator = torch.Generator().manual_seed(_PROBE_SEED)
        for gi, (g, model_layers) in enumerate(zip(layouts, self._model_layers(layouts, path))):
            for li, layer in enumerate(model_layers):
                for ri, codec in enumerate(path.codecs(layer)):
                    probe_key = (id(codec), g.heads, g.tokens, g.head_dim)
                    if probe_key not in probes:
                        x = torch.randn(g.heads, g.tokens, g.head_dim, generator=generator)
                        enc, nnz = self._probe(path, codec, x)
                        # A count that does not move when the data is scaled 100x is what the codec always stores
                        # (per-vector outliers); counts against calibrated ranges do move, and are no floor.
                        _, nnz_scaled = self._probe(path, codec, 100 * x)
                        cap = self._capacity(path, tuple(x.shape), nnz if nnz == nnz_scaled else 0)
                        table = []
                        for name in sorted(enc.tensors):
                            t = enc.tensors[name]
                            shape = (cap,) if name in (outliers.VALUES, outliers.INDICES) else tuple(t.shape)
                            table.append((name, t.dtype, shape))
                        probes[probe_key] = (table, cap)
                    table, cap = probes[probe_key]
                    blocks.append((gi, li, ri, table, cap))
        tokens = {g.tokens for g in layouts}
        if path.pre_rope and len(tokens) != 1:
            raise SerdeConfigError(f"groups of one chunk hold different token counts {sorted(tokens)}; pre-RoPE storage needs one")
        plan = _Plan(blocks, layouts[0].tokens if path.pre_rope else 0)
        with self._lock:
            self._plans[key] = plan
        return plan

    def _header(self, layouts: list[GroupLayout], path: StorePath, plan: _Plan) -> bytes:
        return frame.header_bytes({
            "path": path.name, "method": path.method, "recipe_sha256": path.fingerprint,
            "keys": "pre-rope" if path.pre_rope else "post-rope",
            "rope": [self.rope.theta, self.rope.rot_dim] if path.pre_rope else None,
            "groups": [g.describe() for g in layouts], "payload": plan.payload,
        })

    def max_nbytes(self, shapes, dtypes) -> int:
        """Bytes every chunk of this layout serializes to (the same for all; an exact upper bound)."""
        layouts = self.layouts(shapes, dtypes)
        sizes = []
        for path in self.paths:
            plan = self.plan(layouts, path)
            sizes.append(frame.frame_nbytes(self._header(layouts, path, plan), plan.payload))
        return max(sizes)

    # ----- encode -----
    def choose_path(self, positions: torch.Tensor | None) -> StorePath:
        if not self.primary.pre_rope or positions is not None:
            return self.primary
        if self.fallback is None:
            raise SerdeConfigError(
                f"method '{self.primary.method}' stores keys pre-RoPE, but this chunk came without cached_positions. "
                "Configure a post-RoPE fallback_method (and fallback_recipe) or use a post-RoPE method."
            )
        return self.fallback

    def encode_into(self, groups: list[torch.Tensor], positions: torch.Tensor | None, out: torch.Tensor) -> int:
        """Serialize the group tensors of one chunk into flat uint8 `out`; returns bytes written (= max_nbytes)."""
        layouts = self.layouts([t.shape for t in groups], [t.dtype for t in groups])
        total = self.max_nbytes([t.shape for t in groups], [t.dtype for t in groups])
        if out.dtype != torch.uint8 or out.numel() < total:
            raise SerdeConfigError(f"destination must be a uint8 buffer of at least {total} bytes, got {out.numel()} x {out.dtype}")
        if positions is not None:
            positions = torch.as_tensor(positions).to("cpu", torch.int64).flatten()
            if positions.numel() != layouts[0].tokens:
                raise SerdeConfigError(f"cached_positions holds {positions.numel()} positions for a chunk of {layouts[0].tokens} tokens")
        path = self.choose_path(positions)
        plan = self.plan(layouts, path)
        offset = frame.write_prefix(out, self._header(layouts, path, plan))
        cos = sin = None
        if path.pre_rope:
            offset = self._put(out, offset, positions.to(torch.int32))
            cos, sin = self.rope.cos_sin(positions)
        sinks = None
        if positions is not None and path.sink_tokens:
            sinks = (positions < path.sink_tokens).nonzero().flatten()
        mapping = self._model_layers(layouts, path)
        for gi, li, ri, table, cap in plan.blocks:
            g, t = layouts[gi], groups[gi]
            x = g.read(t.to("cpu") if t.device.type != "cpu" else t, li, ri)
            if ri == 0 and path.pre_rope:
                x = self.rope.unrotate(x, cos, sin)
            codec = path.codecs(mapping[gi][li])[ri]
            enc = codec.encode(x)
            tensors = outliers.fit(codec, enc, x, cap, sinks, self.stats)
            if sorted(tensors) != [name for name, _, _ in table]:
                raise SerdeConfigError(f"{path.method}: codec output {sorted(tensors)} differs from its layout {[n for n, _, _ in table]}")
            for name, dtype, shape in table:
                value = tensors[name]
                if value.dtype != dtype or tuple(value.shape) != shape:
                    raise SerdeConfigError(
                        f"{path.method}: '{name}' came out {value.dtype} {list(value.shape)}, not {dtype} {list(shape)}; "
                        "codecs with data-dependent storage cannot be used by the LMCache serde"
                    )
                offset = self._put(out, offset, value)
        end = frame.seal(out, offset)
        out[end:total].zero_()
        return total

    @staticmethod
    def _put(out: torch.Tensor, offset: int, value: torch.Tensor) -> int:
        raw = _as_bytes(value)
        out[offset : offset + raw.numel()].copy_(raw)
        return offset + raw.numel()

    # ----- decode -----
    def decode_from(self, buf: torch.Tensor, groups: list[torch.Tensor]) -> None:
        """Rebuild a chunk's group tensors (written in place) from the frame in flat uint8 `buf`."""
        buf = buf.reshape(-1).to("cpu")
        if buf.dtype != torch.uint8:
            raise ChunkFormatError(f"a serialized chunk is a uint8 buffer, got {buf.dtype}")
        header, offset = frame.read_prefix(buf)
        path = {p.name: p for p in self.paths}.get(header.get("path"))
        if path is None or header.get("method") != path.method or header.get("recipe_sha256") != path.fingerprint:
            mine = ", ".join(f"{p.name}: {p.method} (recipe {p.fingerprint[:12]})" for p in self.paths)
            raise ChunkFormatError(
                f"chunk was written with method '{header.get('method')}' (recipe {str(header.get('recipe_sha256'))[:12]}, "
                f"{header.get('path')} path); this serde reads {mine}. Configure the same method and recipe as the writer."
            )
        layouts = self.layouts([t.shape for t in groups], [t.dtype for t in groups])
        if header.get("groups") != [g.describe() for g in layouts]:
            raise ChunkFormatError(f"chunk holds groups {header.get('groups')}, the destination is {[g.describe() for g in layouts]}")
        rope = [self.rope.theta, self.rope.rot_dim] if path.pre_rope else None
        if header.get("rope") != rope:
            raise ChunkFormatError(f"chunk keys were stored with RoPE {header.get('rope')}, this serde uses {rope}")
        plan = self.plan(layouts, path)
        if header.get("payload") != plan.payload:
            raise ChunkFormatError(f"chunk payload is {header.get('payload')} bytes, its layout implies {plan.payload}")
        frame.check_seal(buf, offset + plan.payload)
        cos = sin = None
        if path.pre_rope:
            positions, offset = self._take(buf, offset, torch.int32, (plan.positions,))
            cos, sin = self.rope.cos_sin(positions.to(torch.int64))
        mapping = self._model_layers(layouts, path)
        for gi, li, ri, table, cap in plan.blocks:
            g = layouts[gi]
            tensors = {}
            for name, dtype, shape in table:
                tensors[name], offset = self._take(buf, offset, dtype, shape)
            codec = path.codecs(mapping[gi][li])[ri]
            x = codec.decode(Encoded(outliers.unpad(tensors, cap), (g.heads, g.tokens, g.head_dim)))
            if ri == 0 and path.pre_rope:
                x = self.rope.rotate(x, cos, sin)
            g.write(groups[gi], li, ri, x)

    @staticmethod
    def _take(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        n = _numel(shape) * dtype.itemsize
        raw = buf[offset : offset + n].clone()
        value = raw.to(torch.bool) if dtype == torch.bool else raw.view(dtype)
        return value.reshape(shape), offset + n
