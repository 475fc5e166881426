"""What a CompressedCache holds, measured from its tensors, next to an fp16 DynamicCache.

Parts: `codes` (packed codes, or the fp16 values of the fp16 codec), `scales` (per-vector
scale/zero/min/step), `outliers` (sparse values, indices, pointers), `other` (any tensor a codec
names otherwise), `sink_window` (the fp16 head and tail), `codebooks` (codec state shared by all
tokens of a layer, counted once per codec object), `positions` (the int32 position log, shared by
layers). `reserved` is allocated-but-unused buffer capacity, reported apart and not in `total`.
A codec may name the part of each of its tensors with `Encoded.meta["parts"] = {name: part}`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvpack.hf.models import text_config

PARTS = ("codes", "scales", "outliers", "other", "sink_window", "codebooks", "positions")
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
    from transformers.cache_utils import get_layer_types_and_kwargs

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
    def ratio(self) -> float:
        """fp16 DynamicCache bytes / compressed bytes at the same length."""
        return self.fp16_total / max(self.total, 1)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per cached K/V element, fp16 = 16."""
        return 16.0 / self.ratio if self.total else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(per_token_per_layer=self.per_token_per_layer, ratio=self.ratio, bits_per_element=self.bits_per_element)
        return d

    def __str__(self) -> str:
        ptl = self.per_token_per_layer
        lines = [f"{self.method}: {self.tokens} tokens x {self.layers} layers x batch {self.batch}: "
                 f"{self.total / 2**20:.2f} MiB vs fp16 {self.fp16_total / 2**20:.2f} MiB "
                 f"({self.ratio:.2f}x smaller, {self.bits_per_element:.3f} bits/element)"]
        lines += [f"  {part:<12} {ptl[part]:10.2f} B/token/layer" for part in PARTS if self.parts.get(part)]
        lines.append(f"  {'total':<12} {ptl['total']:10.2f} B/token/layer  (+{self.reserved / 2**10:.1f} KiB reserved capacity)")
        return "\n".join(lines)


def _tensor_bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def memory_report(cache) -> MemoryReport:
    """Measure `cache` (a CompressedCache) tensor by tensor."""
    parts = dict.fromkeys(PARTS, 0)
    reserved = 0
    per_layer = []
    seen_codecs: set[int] = set()
    batch = 0
    for layer in cache.layers:
        before = sum(parts.values())
        for codec in (layer.key_codec, layer.value_codec):
            if id(codec) not in seen_codecs:
                seen_codecs.add(id(codec))
                parts["codebooks"] += int(codec.shared_nbytes())
        for stream in (layer.k, layer.v):
            if stream is None:
                continue
            parts["sink_window"] += _tensor_bytes(stream.head) + _tensor_bytes(stream.tail)
            for run in stream.body.runs:
                batch = run.block_shape[0]
                for name in run.buffers:
                    parts[classify(name, run.meta)] += run.nbytes(name)
                    reserved += run.nbytes(name, reserved=True)
            for t in (stream.head, stream.tail):
                if t is not None:
                    batch = t.shape[0]
        per_layer.append(sum(parts.values()) - before)
    if cache.positions is not None:
        parts["positions"] = _tensor_bytes(cache.positions)
        batch = cache.positions.shape[0]
    tokens = cache.get_seq_length()
    total = sum(parts.values())
    return MemoryReport(
        method=cache.recipe.method, tokens=tokens, batch=batch, layers=len(cache.layers), parts=parts,
        reserved=reserved, total=total, fp16_total=fp16_cache_nbytes(cache.model_ref.config, tokens, max(batch, 1)),
        per_layer=per_layer,
    )
