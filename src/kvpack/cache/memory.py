"""What a CompressedCache holds, measured from its tensors and Python objects, next to an fp16 DynamicCache.

Per cache (`parts`, summed in `total`): `codes` (packed codes, or the fp16 values of the fp16 codec),
`scales` (per-vector scale/zero/min/step), `outliers` (sparse values, indices, counts), `other` (any
tensor a codec names otherwise), `sink_window` (the fp16 head and tail), `positions` (the int32
position log, shared by layers), `rope` (cos/sin derived from the positions: the packed attention's
RoPE tables and the decode path's memo), `unlisted` (any other tensor the cache holds, e.g. kernel
views of its runs), `bookkeeping` (the Python objects: layers, streams, runs, dicts, measured with
`sys.getsizeof`), `reserved` (allocated capacity not in use yet: run buffers and position log).

Per model (`model_parts`, summed in `model_total`; held once by the recipe's codecs, which every cache
of the recipe shares, so not charged to each cache): `codebooks` (the codecs' shared state at its
stored size: `shared_nbytes()` of each codec once, what a recipe file holds), `codebook_tables` (the
rest of the codecs' tensors: tables the kernels derive, copies on other devices) and `bookkeeping`.

`stored` is what the encoding stores for this sequence, the paper's count: the per-cache stored parts
plus the codebooks (so `bits_per_element` amortizes the codebooks over this sequence, as the quality
tables do); `total` is everything this cache holds on its own, reserved capacity included.
A codec may name the part of each of its tensors with `Encoded.meta["parts"] = {name: part}`.
"""
from __future__ import annotations

import sys
import types
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kvpack.hf.models import layer_types_and_kwargs, text_config

PARTS = ("codes", "scales", "outliers", "other", "sink_window", "positions", "rope", "unlisted", "bookkeeping",
         "reserved")
MODEL_PARTS = ("codebooks", "codebook_tables", "bookkeeping")
DERIVED = ("rope", "unlisted", "bookkeeping", "reserved")  # held, not part of what the encoding stores
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
    types, kwargs = layer_types_and_kwargs(cfg)
    total = 0
    for kind, kw in zip(types, kwargs):
        held = min(tokens, kw["sliding_window"] - 1) if "sliding_window" in kw and tokens >= kw["sliding_window"] else tokens
        total += 2 * batch * kv_heads * held * head_dim * 2
    return total


@dataclass
class MemoryReport:
    """Measured bytes of a CompressedCache (`parts`, `total`) and of the per-model state its recipe holds once
    (`model_parts`, `model_total`); `per_token_per_layer` divides the cache's parts by tokens seen and layers."""

    method: str
    tokens: int
    batch: int
    layers: int
    parts: dict[str, int]
    reserved: int
    total: int
    fp16_total: int
    per_layer: list[int] = field(default_factory=list)
    model_parts: dict[str, int] = field(default_factory=dict)
    model_total: int = 0

    @property
    def per_token_per_layer(self) -> dict[str, float]:
        denom = max(self.tokens * self.layers, 1)
        out = {k: v / denom for k, v in self.parts.items()}
        out["total"] = self.total / denom
        return out

    @property
    def fixed_bytes(self) -> int:
        """Stored bytes every sequence of the model shares (the per-model `codebooks` part)."""
        return self.model_parts.get("codebooks", 0)

    @property
    def stored(self) -> int:
        """Bytes the encoding stores for this sequence: the cache's parts but derived tables, bookkeeping and
        reserved capacity, plus the codebooks (`fixed_bytes`), as the quality tables count them."""
        return self.total - sum(self.parts.get(p, 0) for p in DERIVED) + self.fixed_bytes

    @property
    def held(self) -> int:
        """Everything held for this one sequence: the cache (`total`) and the per-model state (`model_total`)."""
        return self.total + self.model_total

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the tensors counted (the cache's and the per-model state's, without Python objects): what
        `held_bytes(cache)` finds by walking every tensor reachable from the cache."""
        return self.held - self.parts.get("bookkeeping", 0) - self.model_parts.get("bookkeeping", 0)

    @property
    def ratio(self) -> float:
        """fp16 DynamicCache bytes / bytes this cache holds (`total`, per-model state not charged) at the same length."""
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
    def marginal_bits_per_element(self) -> float:
        """Stored bits per cached element without the fixed bytes: what each further element costs."""
        return 16.0 * (self.stored - self.fixed_bytes) / max(self.fp16_total, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(per_token_per_layer=self.per_token_per_layer, ratio=self.ratio, storage_ratio=self.storage_ratio,
                 stored=self.stored, held=self.held, tensor_bytes=self.tensor_bytes, bits_per_element=self.bits_per_element,
                 fixed_bytes=self.fixed_bytes, marginal_bits_per_element=self.marginal_bits_per_element)
        return d

    def __str__(self) -> str:
        ptl = self.per_token_per_layer
        lines = [f"{self.method}: {self.tokens} tokens x {self.layers} layers x batch {self.batch}: "
                 f"{self.total / 2**20:.2f} MiB held by the cache vs fp16 {self.fp16_total / 2**20:.2f} MiB "
                 f"({self.ratio:.2f}x smaller; the encoding stores {self.bits_per_element:.3f} bits/element)"]
        lines += [f"  {part:<16} {ptl[part]:10.2f} B/token/layer" for part in PARTS if self.parts.get(part)]
        lines.append(f"  {'total':<16} {ptl['total']:10.2f} B/token/layer  (everything the cache holds, reserved "
                     "capacity included)")
        model = ", ".join(f"{p} {self.model_parts[p] / 2**10:.1f} KiB" for p in MODEL_PARTS if self.model_parts.get(p))
        lines.append(f"  per model        {self.model_total / 2**10:10.1f} KiB once for every cache of the recipe ({model})")
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


def python_bytes(obj, seen: set[int] | None = None, stop: tuple = ()) -> int:
    """`sys.getsizeof` summed over the Python objects reachable from `obj` (containers, instances and their
    `__dict__`, numbers, strings; a tensor counts its Python object, not its storage), each once. Walks as
    `held_storages` does: not into nn.Modules, classes, functions, modules or the objects in `stop`."""
    seen = set() if seen is None else seen
    stops = {id(o) for o in stop}
    total = 0
    todo = [obj]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen or id(o) in stops or isinstance(o, (type, nn.Module, types.ModuleType,
                                                                          types.FunctionType, types.MethodType,
                                                                          types.BuiltinFunctionType)):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, (torch.Tensor, str, bytes, int, float, bool, complex, torch.dtype, torch.device)):
            continue
        if isinstance(o, dict):
            todo += list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo += list(o)
        else:
            if hasattr(o, "__dict__"):
                total += sys.getsizeof(vars(o))
                todo += list(vars(o).values())
            for slot in getattr(type(o), "__slots__", ()):
                todo.append(getattr(o, slot, None))
    return total


def model_state(cache) -> list:
    """The per-model objects a cache reaches: its recipe and every codec of its layers (with their copies on
    other devices, `Codec.to`), shared by every cache of the recipe."""
    codecs = [*cache.recipe.key_codecs, *cache.recipe.value_codecs]
    for layer in cache.layers:
        codecs += [getattr(layer, "key_codec", None), getattr(layer, "value_codec", None)]
    return [cache.recipe, *(c for c in codecs if c is not None)]


def memory_report(cache) -> MemoryReport:
    """Measure `cache` (a CompressedCache) tensor by tensor and object by object: what it holds on its own,
    capacity included, and the per-model state its recipe holds once (see the module docstring)."""
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
    model = getattr(cache, "model_ref", None)
    shared = model_state(cache)
    source = getattr(getattr(cache, "log", None), "source", None)
    # per model first: the codecs' tensors (the kernels' views of a run point at them too)
    model_held = {k: n for k, n in held_storages(shared, stop=(model,)).items() if k not in counted}
    counted |= set(model_held)
    stop = (cache, model, source, *shared)
    seen: set[int] = set()
    for obj in _rope_objects(cache):
        for key, nbytes in held_storages(obj, seen, stop).items():
            if key not in counted:
                counted.add(key)
                parts["rope"] += nbytes
    for key, nbytes in held_storages(cache, seen, stop[1:]).items():  # anything else the cache holds
        if key not in counted:
            counted.add(key)
            parts["unlisted"] += nbytes
    parts["bookkeeping"] = python_bytes(cache, stop=(model, source, *shared))
    model_parts = dict.fromkeys(MODEL_PARTS, 0)
    held = sum(model_held.values())
    unique = {id(c): c for c in (*cache.recipe.key_codecs, *cache.recipe.value_codecs)}
    model_parts["codebooks"] = min(held, sum(c.shared_nbytes() for c in unique.values()))
    model_parts["codebook_tables"] = held - model_parts["codebooks"]
    model_parts["bookkeeping"] = python_bytes(shared, stop=(model,))
    tokens = cache.get_seq_length()
    total = sum(parts.values())
    return MemoryReport(
        method=cache.recipe.method, tokens=tokens, batch=batch, layers=len(cache.layers), parts=parts,
        reserved=parts["reserved"], total=total,
        fp16_total=fp16_cache_nbytes(cache.model_ref.config, tokens, max(batch, 1)), per_layer=per_layer,
        model_parts=model_parts, model_total=sum(model_parts.values()),
    )
