"""How long a context and how large a batch fit in a memory budget, per method, next to fp16.

    kvpack plan --model llama-2-7b --memory 80GiB --method kvquant-2bit-1pct,kvquant-3bit-1pct

Counted (bytes):
  weights      every parameter in fp16 (2 bytes), from the model's shapes;
  cache        per layer: sink and recent-window tokens in fp16, the body at the bytes per token the
               method's codec really stores (measured: synthetic K/V of the model's head shape are
               appended to a cache TokenStream in prefill chunks and the stored tensors are counted, the
               same code path as CompressedCache), plus the codec's shared bytes (codebooks, per-channel
               ranges) once per layer, plus the int32 position log (4 bytes per token) of pre-RoPE caches;
  activations  an estimate for decoding (stated in the output): per sequence, fp32 hidden states and MLP
               intermediates of one token (4 * (4 * hidden + 2 * intermediate) bytes), fp32 logits
               (4 * vocab), attention scores over the whole context for one layer (4 * heads * context:
               kvpack's packed attention holds them, not the decoded history), times 1.1 allocator slack.
A prefill is assumed chunked, so its activations stay below the decode-time cache growth.
Codecs are built with the method's settings and synthetic parameters (the stored bytes do not depend
on calibrated values; outlier shares follow the thresholds' quantiles).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvpack.cache.stream import TokenStream
from kvpack.errors import KVPackError
from kvpack.methods import family_named, parse_method
from kvpack.methods.synthetic import synthetic_kv
from transformers import AutoConfig

# Public configs (config.json on the Hugging Face hub), the fields the plan needs.
KNOWN_SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False, source="meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        head_dim=128, intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False, source="meta-llama/Llama-2-13b-hf"),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False, source="meta-llama/Meta-Llama-3-8B"),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768,
                       tie_word_embeddings=False, source="mistralai/Mistral-7B-v0.3 (no sliding window)"),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     head_dim=128, intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072,
                     tie_word_embeddings=False, attention_bias=True, source="Qwen/Qwen2-7B"),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, source="HuggingFaceTB/SmolLM2-135M-Instruct"),
}
PAPER_CLAIM = ("KVQuant (Hooper et al. 2024): LLaMA-7B with a 1M-token context on one A100-80GB at 2 bits "
               "(nuq2 with 1% outliers), a memory estimate")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


@dataclass
class Shape:
    """What the plan needs of a decoder: sizes of the layers, vocab, attention heads."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    source: str = ""

    def parameters(self) -> int:
        h, kv, d = self.hidden_size, self.num_key_value_heads, self.head_dim
        q = self.num_attention_heads * d
        attn = h * q + 2 * h * kv * d + q * h + ((q + 2 * kv * d) if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h


def parse_memory(text: str) -> int:
    """'80GiB', '24 GB', '1.5TiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match[2].lower() not in _UNITS:
        raise KVPackError(f"cannot read memory size '{text}'; use e.g. 80GiB, 24GB, 512MiB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def load_shape(spec: str) -> Shape:
    """A bundled well-known shape, a config.json file or folder, or a hub id (needs the network or a local cache)."""
    key = spec.lower()
    if key in KNOWN_SHAPES:
        return Shape(name=key, **KNOWN_SHAPES[key])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        return _from_config(config, spec)
    try:
        config = AutoConfig.from_pretrained(spec).to_dict()
    except Exception as exc:
        raise KVPackError(f"'{spec}' is not a bundled shape ({', '.join(KNOWN_SHAPES)}), a config.json, nor a "
                          f"loadable hub id: {exc}") from exc
    return _from_config(config, spec)


def _from_config(config: dict, name: str) -> Shape:
    config = config.get("text_config", config) or config
    heads = config["num_attention_heads"]
    return Shape(
        name=name, hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)), sliding_window=config.get("sliding_window"),
        source=str(name),
    )


# ---------------------------------------------------------------------------------------------- bytes per token
def method_codecs(method: str, heads: int, dim: int):
    """(settings, key codec, value codec) of `method` for heads x dim vectors, with synthetic parameters
    (asked of the method's family)."""
    settings = parse_method(method)
    key, value = family_named(settings.family).synthetic_codecs(settings, heads, dim)
    return settings, key, value


def _stream_bytes(stream) -> int:
    total = 0
    for t in (stream.head, stream.tail):
        if t is not None:
            total += t.numel() * t.element_size()
    for run in stream.body.runs:
        total += sum(run.nbytes(name) for name in run.buffers)
    return total


@dataclass
class Storage:
    """Measured storage of one method for one layer and one sequence."""

    method: str
    body_bytes_per_token: float  # K and V of one layer
    fixed_tokens: int  # sink + recent window, stored in fp16
    shared_bytes: int  # per layer (codebooks, per-channel ranges)
    positions: bool  # an int32 position per token (pre-RoPE caches)
    bits_per_element: float  # body bits per cached element
    measured_tokens: int


@torch.no_grad()
def measure_storage(method: str, heads: int, dim: int, tokens: int = 1024, chunk: int = 256) -> Storage:
    """Append `tokens` synthetic tokens to one layer's cache streams and count what they hold."""


    settings, key, value = method_codecs(method, heads, dim)
    if settings.family == "fp16":
        return Storage(method, 2 * 2 * heads * dim, 0, 0, False, 16.0, 0)
    if settings.family == "rvq":
        tokens, chunk = min(tokens, 128), min(chunk, 64)  # fixed bytes per token; the search is slow on a CPU
    fixed = settings.sink_tokens + settings.recent_tokens
    streams = [TokenStream(key, settings.sink_tokens, settings.recent_tokens),
               TokenStream(value, settings.sink_tokens, settings.recent_tokens)]
    total = fixed + tokens
    for i, stream in enumerate(streams):
        x = synthetic_kv(heads, total, dim, 10 + i)
        for s in range(0, total, chunk):
            stream.append(x[..., s:s + chunk, :])
    body = sum(_stream_bytes(s) for s in streams) - 2 * 2 * heads * dim * fixed
    body_tokens = streams[0].body.tokens + streams[0].tail_len - settings.recent_tokens
    per_token = body / max(body_tokens, 1)
    shared = key.shared_nbytes() + value.shared_nbytes()
    return Storage(method, per_token, fixed, int(shared), bool(settings.pre_rope), 8 * per_token / (2 * heads * dim),
                   body_tokens)


# ---------------------------------------------------------------------------------------------- the plan
def activation_bytes(shape: Shape, context: int, batch: int) -> int:
    per_seq = 4 * (4 * shape.hidden_size + 2 * shape.intermediate_size) + 4 * shape.vocab_size \
        + 4 * shape.num_attention_heads * context
    return int(1.1 * batch * per_seq)


def cache_bytes(shape: Shape, storage: Storage, context: int, batch: int) -> int:
    held = context if shape.sliding_window is None else min(context, shape.sliding_window)
    fp16_tokens = min(held, storage.fixed_tokens)
    per_layer = batch * ((held - fp16_tokens) * storage.body_bytes_per_token
                         + fp16_tokens * 2 * 2 * shape.num_key_value_heads * shape.head_dim) + storage.shared_bytes
    positions = 4 * batch * context if storage.positions else 0
    return int(shape.num_hidden_layers * per_layer + positions)


def total_bytes(shape: Shape, storage: Storage, context: int, batch: int) -> int:
    return 2 * shape.parameters() + cache_bytes(shape, storage, context, batch) + activation_bytes(shape, context, batch)


def _largest(fits, low: int, high: int) -> int:
    """Largest n in [low, high] with fits(n) (monotone); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class PlanRow:
    method: str
    bits_per_element: float
    bytes_per_token: float  # all layers, one sequence, body
    max_context: int  # at `batch`
    batch: int
    max_batch: int  # at `context`
    context: int
    weights_bytes: int
    cache_bytes_at_max: int
    activation_bytes_at_max: int
    ratio_vs_fp16_context: float = 1.0
    detail: dict = field(default_factory=dict)


def plan(shape: Shape, memory: int, methods: list[str], batch: int = 1, context: int | None = None,
         limit: int = 1 << 34) -> list[PlanRow]:
    """fp16 first, then each method: the longest context at `batch`, the largest batch at `context`."""
    context = context or shape.max_position_embeddings or 4096
    rows = []
    for method in dict.fromkeys(["fp16", *methods]):
        storage = measure_storage(method, shape.num_key_value_heads, shape.head_dim)
        longest = _largest(lambda n: total_bytes(shape, storage, n, batch) <= memory, 1, limit)
        widest = _largest(lambda b: total_bytes(shape, storage, context, b) <= memory, 1, 1 << 24)
        at = max(longest, 1)
        rows.append(PlanRow(
            method=method, bits_per_element=storage.bits_per_element,
            bytes_per_token=storage.body_bytes_per_token * shape.num_hidden_layers + (4 if storage.positions else 0),
            max_context=longest, batch=batch, max_batch=widest, context=context, weights_bytes=2 * shape.parameters(),
            cache_bytes_at_max=cache_bytes(shape, storage, at, batch),
            activation_bytes_at_max=activation_bytes(shape, at, batch), detail=asdict(storage),
        ))
    base = rows[0].max_context
    for row in rows:
        row.ratio_vs_fp16_context = row.max_context / max(base, 1)
    return rows


def format_plan(shape: Shape, memory: int, rows: list[PlanRow], claim: str | None = None) -> str:
    lines = [f"{shape.name} ({shape.source or 'config'}): {shape.parameters() / 1e9:.2f}B parameters = "
             f"{2 * shape.parameters() / 2**30:.1f} GiB in fp16; {shape.num_hidden_layers} layers x "
             f"{shape.num_key_value_heads} KV heads x {shape.head_dim}; budget {memory / 2**30:.1f} GiB",
             f"{'method':<22}{'bits/elem':>10}{'KiB/token':>11}{'max context':>14}{'x fp16':>8}"
             f"{'max batch':>11}{'@ context':>11}"]
    for r in rows:
        lines.append(f"{r.method:<22}{r.bits_per_element:>10.3f}{r.bytes_per_token / 1024:>11.1f}{r.max_context:>14,}"
                     f"{r.ratio_vs_fp16_context:>8.2f}{r.max_batch:>11,}{r.context:>11,}")
    lines.append(f"max context at batch {rows[0].batch}; bits/elem measured by encoding synthetic K/V with the method's "
                 "codec (cache storage path, prefill blocks of 256 tokens), sink/recent tokens in fp16, codebooks "
                 "amortized; activations: the decode estimate in kvpack.evaluate.plan")
    if claim:
        lines.append(f"paper: {claim}")
    return "\n".join(lines)


def rows_as_dicts(shape: Shape, memory: int, rows: list[PlanRow]) -> list[dict]:
    out = []
    for r in rows:
        d = asdict(r)
        d.update(model=shape.name, model_source=shape.source, memory_bytes=memory, parameters=shape.parameters())
        out.append(d)
    return out


def paper_comparison(rows: list[PlanRow]) -> dict:
    """The 2-bit row next to KVQuant's 1M-token claim (LLaMA-7B, A100-80GB)."""
    two = [r for r in rows if r.method.startswith("kvquant-2bit")]
    return {"claim": PAPER_CLAIM, "claimed_context": 1_000_000,
            "planned_context": two[0].max_context if two else None,
            "planned_bits_per_element": two[0].bits_per_element if two else None,
            "fits_claim": (two[0].max_context >= 1_000_000) if two else None}

