"""What a CompressedCache holds, measured from its tensors, next to an fp16 DynamicCache.

Parts: `codes` (packed codes, or the fp16 values of the fp16 codec), `scales` (per-vector
scale/zero/min/step), `outliers` (sparse values, indices, pointers), `other` (any tensor a codec
names otherwise), `sink_window` (the fp16 head and tail), `codebooks` (the recipe's codecs'
shared state at its stored size: `shared_nbytes()` of each codec once, what a recipe file holds:
codebooks, levels, ranges, rotations), `codebook_copies` (the rest of what the codecs hold in
memory: fp32 and padded working copies of that state, the tables kernels derive from it),
`positions` (the int32 position log, shared by layers), `rope` (cos/sin derived from the positions:
the packed attention's RoPE tables and the decode path's memo), `reserved` (allocated capacity not
in use yet: run buffers and position log). `stored` leaves out what is derived (`codebook_copies`,
`rope`) and `reserved`; `total` is everything held, reserved capacity included: the bytes
`held_bytes(cache)` finds by walking every tensor reachable from the cache.
A codec may name the part of each of its tensors with `Encoded.meta["parts"] = {name: part}`.
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kvpack.hf.models import text_config
from transformers.cache_utils import get_layer_types_and_kwargs

PARTS = ("codes", "scales", "outliers", "other", "sink_window", "codebooks", "codebook_copies", "positions", "rope",
         "reserved")
DERIVED = ("codebook_copies", "rope", "reserved")  # held, not part of what the encoding stores
_SCALE_NAMES = {"min", "step", "scale", "zero", "norm", "mean", "std", "lo", "hi"}
_OUTLIER_HINTS = ("outlier", "sparse", "ptr", "col", "row", "nnz")


def classify(name: str, meta: dict | None = None) -> str:
    """Part of an encoded tensor, from the codec's own labels or its name."""
    declared = (meta or {}).get("parts", {})
    if name in declared:
        return declared[name]
    low = name.lower()
    if any(h in low for h in _OUTLIER_HINTS):
        return "outliers"
    if low.startswith("code") or low in ("values", "indices", "idx", "packed"):
        return "codes"
    if low in _SCALE_NAMES or "scale" in low or "zero" in low:
        return "scales"
    return "other"


def fp16_cache_nbytes(config, tokens: int, batch: int = 1) -> int:
    """Bytes an fp16 DynamicCache holds for `tokens` tokens (sliding layers keep window - 1)."""

    cfg = text_config(config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    types, kwargs = get_layer_types_and_kwargs(cfg)
    total = 0
    for kind, kw in zip(types, kwargs):
        held = min(tokens, kw["sliding_window"] - 1) if "sliding_window" in kw and tokens >= kw["sliding_window"] else tokens
        total += 2 * batch * kv_heads * held * head_dim * 2
    return total


@dataclass
class MemoryReport:
    """Measured bytes of a CompressedCache; `per_token_per_layer` divides by tokens seen and layers."""

    method: str
    tokens: int
    batch: int
    layers: int
    parts: dict[str, int]
    reserved: int
    total: int
    fp16_total: int
    per_layer: list[int] = field(default_factory=list)

    @property
    def per_token_per_layer(self) -> dict[str, float]:
        denom = max(self.tokens * self.layers, 1)
        out = {k: v / denom for k, v in self.parts.items()}
        out["total"] = self.total / denom
        return out

    @property
    def stored(self) -> int:
        """Bytes of what the encoding stores (every part but derived copies, RoPE tables and reserved capacity)."""
        return self.total - sum(self.parts.get(p, 0) for p in DERIVED)

    @property
    def ratio(self) -> float:
        """fp16 DynamicCache bytes / bytes held (everything, `total`) at the same length."""
        return self.fp16_total / max(self.total, 1)

    @property
    def storage_ratio(self) -> float:
        """fp16 DynamicCache bytes / bytes the encoding stores (`stored`): the format's compression."""
        return self.fp16_total / max(self.stored, 1)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per cached K/V element (fp16 = 16): codes, scales, outliers, fp16 tokens, positions, codebooks."""
        return 16.0 / self.storage_ratio if self.stored else 0.0

    @property
    def fixed_bytes(self) -> int:
        """Stored bytes every sequence of the model shares (the `codebooks` part)."""
        return self.parts.get("codebooks", 0)

    @property
    def marginal_bits_per_element(self) -> float:
        """Stored bits per cached element without the fixed bytes: what each further element costs."""
        return 16.0 * (self.stored - self.fixed_bytes) / max(self.fp16_total, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(per_token_per_layer=self.per_token_per_layer, ratio=self.ratio, storage_ratio=self.storage_ratio,
                 stored=self.stored, bits_per_element=self.bits_per_element, fixed_bytes=self.fixed_bytes,
                 marginal_bits_per_element=self.marginal_bits_per_element)
        return d

    def __str__(self) -> str:
        ptl = self.per_token_per_layer
        lines = [f"{self.method}: {self.tokens} tokens x {self.layers} layers x batch {self.batch}: "
                 f"{self.total / 2**20:.2f} MiB held vs fp16 {self.fp16_total / 2**20:.2f} MiB "
                 f"({self.ratio:.2f}x smaller; the encoding stores {self.bits_per_element:.3f} bits/element)"]
        lines += [f"  {part:<16} {ptl[part]:10.2f} B/token/layer" for part in PARTS if self.parts.get(part)]
        lines.append(f"  {'total':<16} {ptl['total']:10.2f} B/token/layer  (everything held, reserved capacity included)")
        return "\n".join(lines)


_OPAQUE = (str, bytes, int, float, bool, complex, type, nn.Module, torch.dtype, torch.device, types.FunctionType,
           types.MethodType, types.BuiltinFunctionType, types.ModuleType)


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor lives in (views of one buffer share it)."""
    storage = t.untyped_storage()
    return storage.device.type, storage.device.index, storage.data_ptr()


def held_storages(obj, seen: set[int] | None = None, stop: tuple = ()) -> dict[tuple, int]:
    """{storage key: storage bytes} of every tensor reachable from `obj`.

    Walks attributes, dicts, lists, tuples and sets recursively; does not enter nn.Modules (model
    weights are not the cache's), classes, functions, or the objects in `stop`. `seen` (object ids)
    may be shared between calls so that nothing is walked twice."""
    seen = set() if seen is None else seen
    stops = {id(o) for o in stop}
    found: dict[tuple, int] = {}
    todo = [obj]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen or id(o) in stops:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.is_meta or o.layout != torch.strided:
                continue
            nbytes = o.untyped_storage().nbytes()
            if nbytes:
                found[storage_key(o)] = nbytes
            continue
        if isinstance(o, _OPAQUE):
            continue
        if isinstance(o, dict):
            todo += list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo += list(o)
        else:
            if hasattr(o, "__dict__") and not isinstance(o, type):
                todo += list(vars(o).values())
            for slot in getattr(type(o), "__slots__", ()):
                todo.append(getattr(o, slot, None))
    return found


def held_bytes(cache) -> int:
    """Bytes of every tensor reachable from `cache`, each storage once (the model's own tensors excluded)."""
    return sum(held_storages(cache, stop=(getattr(cache, "model_ref", None),)).values())


def _storage_bytes(t: torch.Tensor | None, counted: set[tuple]) -> int:
    """Bytes of t's whole storage, once per storage."""
    if t is None:
        return 0
    key = storage_key(t)
    if key in counted:
        return 0
    counted.add(key)
    return t.untyped_storage().nbytes()


def _rope_objects(cache) -> list:
    """What holds cos/sin derived from positions: the packed-attention RoPE tables (kernels.rope.RopeTable)
    and the decode path's per-forward memo (cache.positions.PositionLog.memo, emptied when a forward ends)."""
    packed = getattr(cache, "packed", None)
    log = getattr(cache, "log", None)
    return [getattr(packed, "rope", None), getattr(log, "memo", None)]


def memory_report(cache) -> MemoryReport:
    """Measure `cache` (a CompressedCache) tensor by tensor: everything it holds, capacity included."""
    parts = dict.fromkeys(PARTS, 0)
    per_layer = []
    counted: set[tuple] = set()  # storages counted so far: nothing is counted twice
    batch = 0
    for layer in cache.layers:
        before = sum(parts.values())
        for stream in (layer.k, layer.v):
            if stream is None:
                continue
            parts["sink_window"] += _storage_bytes(stream.head, counted) + _storage_bytes(stream.tail, counted)
            for run in stream.body.runs:
                batch = run.block_shape[0]
                for name, buf in run.buffers.items():
                    key = storage_key(buf)
                    if key in counted:
                        continue
                    counted.add(key)
                    used = run.nbytes(name)
                    parts[classify(name, run.meta)] += used
                    parts["reserved"] += buf.untyped_storage().nbytes() - used
            for t in (stream.head, stream.tail):
                if t is not None:
                    batch = t.shape[0]
        per_layer.append(sum(parts.values()) - before)
    positions = cache.positions
    if positions is not None:
        used = positions.numel() * positions.element_size()
        parts["positions"] = used
        parts["reserved"] += _storage_bytes(positions, counted) - used
        batch = positions.shape[0]
    stop = (cache, getattr(cache, "model_ref", None), getattr(getattr(cache, "log", None), "source", None))
    seen: set[int] = set()
    for kind, objs in (("codebooks", [cache.recipe]), ("rope", _rope_objects(cache))):
        for obj in objs:
            for key, nbytes in held_storages(obj, seen, stop).items():
                if key not in counted:
                    counted.add(key)
                    parts[kind] += nbytes
    # what the codecs hold beyond their stored state (fp32 / padded copies, kernel tables) is derived
    unique = {id(c): c for c in (*cache.recipe.key_codecs, *cache.recipe.value_codecs)}
    shared = min(parts["codebooks"], sum(c.shared_nbytes() for c in unique.values()))
    parts["codebook_copies"], parts["codebooks"] = parts["codebooks"] - shared, shared
    tokens = cache.get_seq_length()
    total = sum(parts.values())
    return MemoryReport(
        method=cache.recipe.method, tokens=tokens, batch=batch, layers=len(cache.layers), parts=parts,
        reserved=parts["reserved"], total=total,
        fp16_total=fp16_cache_nbytes(cache.model_ref.config, tokens, max(batch, 1)), per_layer=per_layer,
    )
