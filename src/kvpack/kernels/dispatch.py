"""Attention of a few query tokens over one cache layer's stored parts, read straight from packed storage.

`layer_attention(layer, query, ...)` reads the layer's fp16 head (sink) and tail (recent window) tokens
directly, and each run of encoded blocks by a kernel that reads the packed codes (the cache hands the
layer and, for pre-RoPE keys, a RopeTable of its logged positions; cache/packed.py decides when):

- on the CPU, one C++ call per layer (kernels/cpu.py) covers fp16, nuq (single and mixed widths), rvq and
  TurboQuant runs: LUT decode, RoPE at each key's position, q . k, softmax, p . v, outliers in the same call;
- on CUDA, the split-K Triton pass over the layer (kernels/triton_decode.py), else per-run Triton kernels;
- anything else (a layer the C++ call declines, e.g. RoPE not in halves): per run, the torch reference
  (kernels/reference.py) decodes one chunk of blocks at a time.

Exactness: the kernels compute the same numbers as decode-then-attend up to float summation order
(tests compare with the decode path to ~1e-5). Calls with autograd on or with features the path does
not cover (dropout, attention weights) use the model's own attention on decoded keys/values.

Memory: besides the packed storage, one call holds scores/probabilities [B, Hq, Q, tokens] fp32
(1/D of the keys' fp32 size) and per-chunk temporaries; never the decoded history.

`blockwise_attention(layer, query, ...)` serves calls of many query tokens (prefill chunks, multi-token
steps): flash-style, it walks the stored tokens in windows of at most `window_tokens` tokens, decodes
only that window's keys and values (`stream.read_range`: fp16 head/tail sliced, body blocks decoded
whole when they fit, else cut by token range through `Codec.slice_tokens`; a codec that cannot cut its
storage decodes that block whole), and merges the windows' softmax outputs by their log-sum-exp (on the
CPU torch's fused flash kernel attends each window; elsewhere, or with softcap, a running max / sum /
output per query row in torch). The query heads sharing a KV head attend as one group of rows, so
keys and values are never repeated per query head. Memory: scores [B, Hq, Q, window] fp32 (or the
fused kernel's tiles) plus one window of decoded keys and values, never the whole history.
"""
from __future__ import annotations

import bisect

import torch

from kvpack.hf.rope import apply_rope
from kvpack.kernels import cpu, reference, triton_attention, triton_decode
from kvpack.kernels.rope import RopeAt, RopeTable
BACKENDS = ("auto", "torch", "cpu", "triton")
DEFAULT_MAX_QUERIES = 16
WINDOW_TOKENS = 2048  # stored tokens decoded at a time by blockwise_attention
FUSED_CPU = True  # blockwise_attention on the CPU: torch's fused flash kernel per window (False: the torch loop)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# ------------------------------------------------------------------------------------------ one layer
def _use_cpu(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "cpu") or device.type != "cpu":
        return False
    if cpu.available():
        return True
    if backend == "cpu":
        raise RuntimeError(f"CPU attention kernels unavailable: {cpu.error()}")
    return False


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "triton") or device.type != "cuda":
        return False
    if triton_attention.available():
        return True
    if backend == "triton":
        raise RuntimeError("Triton attention kernels unavailable (is triton installed?)")
    return False


def key_run_scores(run, codec, q: torch.Tensor, rope: RopeAt | None, out: torch.Tensor, backend: str = "auto") -> str:
    """Scores of q [B, H, G, D] against one run's keys into out [B, H, G, run tokens]; returns the path used.

    On the CPU the C++ kernels read whole layers (`cpu.layer_attention`); a layer they decline comes here and
    is read by the torch reference. rope: cos/sin of the run's tokens (None when keys are stored post-RoPE)."""
    if _use_triton(backend, q.device):
        rs = None if rope is None else rope.materialize()  # the per-run Triton kernels read cos/sin rows
        if (rs is None or rs.half) and triton_attention.key_scores(run, codec, q, rs, out):
            return "triton"
    reference.key_scores(run, codec, q, rope, out)
    return "torch"


def value_run_accum(run, codec, p, out, backend: str = "auto") -> str:
    """out [B, H, G, D] += p [B, H, G, run tokens] . one run's values; returns the path used."""
    if _use_triton(backend, p.device):
        if triton_attention.value_accum(run, codec, p, out):
            return "triton"
    reference.value_accum(run, codec, p, out)
    return "torch"


def _heads(stream) -> int:
    for t in (stream.head, stream.tail):
        if t is not None:
            return t.shape[1]
    for run in stream.body.runs:
        return run.block_shape[1]
    raise ValueError("empty cache layer")


def _apply_mask(s: torch.Tensor, mask: torch.Tensor | None, queries: int) -> torch.Tensor:
    """s [B, H, G0, Q, K] scores; mask [B|1, 1|Hq, Q, >=K] bool (True = attend) or additive float."""
    batch, heads, g0, q, k = s.shape
    if mask is None:
        if queries > 1:  # causal, aligned bottom-right: query i sees keys up to k - q + i
            rows = torch.arange(q, device=s.device).unsqueeze(1) + (k - q)
            s = s.masked_fill(torch.arange(k, device=s.device) > rows, float("-inf"))
        return s
    m = mask[..., -k:] if mask.shape[-1] != k else mask
    if m.shape[1] == 1:
        m = m.unsqueeze(2)
    else:
        m = m.reshape(m.shape[0], heads, g0, q, k)
    if m.dtype == torch.bool:
        return s.masked_fill(~m, float("-inf"))
    return s + m.float()


def _triton_layer(layer, query: torch.Tensor, mask, scale: float, softcap, rope: RopeTable | None, total: int):
    """The split-K Triton pass over the whole layer (kernels/triton_decode.py): RoPE computed in the kernel from the
    logged positions, so the RopeTable is never built here; None when the pass does not cover the layer."""
    positions, inv_freq, attention_scaling = None, None, 1.0
    if rope is not None:
        source = rope.log.source
        if source.takes_layer_type:  # per-layer-type frequencies (Gemma3): the per-run path handles them
            return None
        first = layer.first_slot
        positions = rope.log.positions[:, first:first + total]
        inv_freq = source.module.inv_freq
        attention_scaling = getattr(source.module, "attention_scaling", 1.0)
    return triton_decode.layer_attention(layer, query, mask, scale, softcap, positions, inv_freq, attention_scaling)


def layer_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    scaling: float | None = None, softcap: float | None = None, backend: str = "auto",
                    rope: RopeTable | None = None, paths: list | None = None) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over everything `layer` (a CompressedLayer) stores.

    Returns [B, Q, Hq, D] in query's dtype (transformers' attention-function layout). `rope` is
    needed for pre-RoPE caches; `paths` (if given) collects the kernel used per run.
    """
    k_stream, v_stream = layer.k, layer.v
    batch, hq, queries, dim = query.shape
    scale = dim ** -0.5 if scaling is None else scaling
    total = k_stream.stored
    if _use_triton(backend, query.device):
        out = _triton_layer(layer, query, attention_mask, scale, softcap, rope, total)
        if out is not None:
            if paths is not None:
                paths.append(("layer", "triton"))
            return out
    rs = None
    if rope is not None:  # keys stored pre-RoPE: rotate them at their logged positions
        first = layer.first_slot
        rs = rope.get(layer.layer_idx, first, first + total)
    if _use_cpu(backend, query.device):
        mask = attention_mask
        if mask is not None and mask.is_floating_point() and mask.dtype != torch.float32:
            mask = mask.float()  # the kernel reads additive masks in float32 (bf16/fp16 models under eager)
        out = cpu.layer_attention(layer, query, mask, scale, softcap, rs)
        if out is not None:
            if paths is not None:
                paths.append(("layer", "cpu"))
            return out.to(query.dtype)
    heads = _heads(k_stream)
    g0 = hq // heads
    groups = g0 * queries
    q = (query.float() * scale).contiguous().view(batch, heads, groups, dim)
    scores = torch.empty(batch, heads, groups, total, dtype=torch.float32, device=query.device)
    offset = 0

    def fp16_keys(t: torch.Tensor) -> None:
        nonlocal offset
        n = t.shape[-2]
        k = t.float()
        if rs is not None:
            k = apply_rope(k, *rs[offset:offset + n].full())
        scores[..., offset:offset + n] = q @ k.transpose(-1, -2)
        offset += n

    if k_stream.head is not None:
        fp16_keys(k_stream.head)
    for run in k_stream.body.runs:
        if run.count:
            n = run.tokens
            used = key_run_scores(run, layer.key_codec, q, None if rs is None else rs[offset:offset + n],
                                  scores[..., offset:offset + n], backend)
            if paths is not None:
                paths.append(("keys", used))
            offset += n
    if k_stream.tail is not None:
        fp16_keys(k_stream.tail)
    if offset != total:
        raise RuntimeError(f"layer {layer.layer_idx}: read {offset} keys of {total}")

    s = scores.view(batch, heads, g0, queries, total)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = _apply_mask(s, attention_mask, queries)
    p = torch.softmax(s, dim=-1).reshape(batch, heads, groups, total)

    out = torch.zeros(batch, heads, groups, dim, dtype=torch.float32, device=query.device)
    offset = 0
    if v_stream.head is not None:
        n = v_stream.head_len
        out += p[..., :n] @ v_stream.head.float()
        offset = n
    for run in v_stream.body.runs:
        if run.count:
            n = run.tokens
            used = value_run_accum(run, layer.value_codec, p[..., offset:offset + n], out, backend)
            if paths is not None:
                paths.append(("values", used))
            offset += n
    if v_stream.tail is not None:
        n = v_stream.tail_len
        out += p[..., offset:offset + n] @ v_stream.tail.float()
        offset += n
    if offset != total:
        raise RuntimeError(f"layer {layer.layer_idx}: read {offset} values of {total}")
    out = out.view(batch, heads, g0, queries, dim).reshape(batch, hq, queries, dim)
    return out.transpose(1, 2).contiguous().to(query.dtype)


# ------------------------------------------------------------------------------------------ many queries
def windows(cuts: list[int], total: int, max_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [start, stop) covering 0..total, each of at most `max_tokens` tokens, ending on one of the
    sorted `cuts` (block boundaries) whenever one lies in reach, else after exactly `max_tokens` tokens."""
    if max_tokens < 1:
        raise ValueError(f"window size must be >= 1, got {max_tokens}")
    out, start = [], 0
    while start < total:
        limit = min(start + max_tokens, total)
        i = bisect.bisect_right(cuts, limit) - 1
        stop = cuts[i] if i >= 0 and cuts[i] > start else limit
        out.append((start, stop))
        start = stop
    return out


def _mask_window(s: torch.Tensor, mask: torch.Tensor | None, start: int, total: int) -> torch.Tensor:
    """Mask scores s [B, H, G0, Q, n] of stored tokens start..start+n-1 of `total`, in place.

    mask: [B|1, 1|Hq, Q, total] bool (True = attend) or additive float, already cut to the stored tokens;
    None = causal aligned bottom-right (query i sees tokens up to total - Q + i)."""
    batch, heads, g0, queries, n = s.shape
    if mask is None:
        if start + n - 1 > total - queries:  # some token of this window lies after some query
            rows = torch.arange(queries, device=s.device).unsqueeze(1) + (total - queries)
            s.masked_fill_(torch.arange(start, start + n, device=s.device) > rows, float("-inf"))
        return s
    m = mask[..., start:start + n]
    m = m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], heads, g0, queries, n)
    if m.dtype == torch.bool:
        return s.masked_fill_(~m, float("-inf"))
    return s.add_(m.to(s.dtype))


class OnlineSoftmax:
    """Running softmax(s) . v over windows of keys: max m, sum l [B, H, R] and output acc [B, H, R, D] fp32."""

    def __init__(self, batch: int, heads: int, rows: int, dim: int, device: torch.device):
        self.m = torch.full((batch, heads, rows), float("-inf"), device=device)
        self.l = torch.zeros(batch, heads, rows, device=device)
        self.acc = torch.zeros(batch, heads, rows, dim, device=device)

    def add(self, s: torch.Tensor, v: torch.Tensor) -> None:
        """One window: scores s [B, H, R, n] (masked: -inf; overwritten) and values v [B, H, n, D]."""
        m = torch.maximum(self.m, s.amax(-1))
        safe = m.masked_fill(m == float("-inf"), 0.0)  # rows that see nothing yet: exp(-inf - 0) = 0
        p = s.sub_(safe.unsqueeze(-1)).exp_()
        scale = (self.m - safe).exp_()
        self.l.mul_(scale).add_(p.sum(-1))
        self.acc.mul_(scale.unsqueeze(-1)).add_(p @ v)
        self.m = m

    def result(self) -> torch.Tensor:
        """acc / l [B, H, R, D]; rows that saw no token at all (fully masked) are 0."""
        return self.acc / torch.where(self.l > 0, self.l, torch.ones_like(self.l)).unsqueeze(-1)


class LseMerge:
    """Merges attention outputs of windows of keys by their log-sum-exp: out [B, H, R, D], lse [B, H, R] fp32."""

    def __init__(self, batch: int, heads: int, rows: int, dim: int, device: torch.device):
        self.lse = torch.full((batch, heads, rows), float("-inf"), device=device)
        self.out = torch.zeros(batch, heads, rows, dim, device=device)

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """One window's softmax output out [B, H, R, D] and log-sum-exp lse [B, H, R] (-inf: row saw nothing)."""
        new = torch.logaddexp(self.lse, lse)
        safe = new.masked_fill(new == float("-inf"), 0.0)
        self.out.mul_((self.lse - safe).exp_().unsqueeze(-1)).add_(out * (lse - safe).exp_().unsqueeze(-1))
        self.lse = new

    def result(self) -> torch.Tensor:
        return self.out


def _window_bias(mask: torch.Tensor | None, start: int, n: int, total: int, queries: int,
                 g0: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The window's mask for the fused kernel: (additive fp32 bias [B|1, H|1, g0 * Q, n] or None when nothing is
    masked, rows [B|1, H|1, g0 * Q] that see at least one token or None when all do). mask as in _mask_window."""
    if mask is None:
        if start + n - 1 <= total - queries:
            return None, None
        rows = torch.arange(queries).unsqueeze(1) + (total - queries)
        seen = torch.arange(start, start + n) <= rows  # [Q, n]
        m = seen.view(1, 1, 1, queries, n)
    else:
        m = mask[..., start:start + n]
        m = m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], -1, g0, queries, n)
        if m.dtype == torch.bool and bool(m.all()):
            return None, None
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
        visible = m.any(-1)
    else:
        bias = m.float()
        visible = (bias > float("-inf")).any(-1)
    shape = (bias.shape[0], bias.shape[1], g0, queries)
    bias = bias.expand(*shape, n).reshape(shape[0], shape[1], g0 * queries, n)
    visible = visible.expand(shape).reshape(shape[0], shape[1], g0 * queries)
    return bias, None if bool(visible.all()) else visible


def _fused_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  visible: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v and its log-sum-exp by torch's fused CPU flash kernel: q [B, H, R, D],
    k/v [B, H, n, D] fp32 -> ([B, H, R, D], [B, H, R]); rows that see nothing get 0 and -inf."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    if visible is not None:
        out = out.masked_fill(~visible.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(~visible, float("-inf"))
    return out, lse


def _use_fused(query: torch.Tensor, softcap: float | None) -> bool:
    return FUSED_CPU and _FLASH_CPU is not None and query.device.type == "cpu" and not softcap


def blockwise_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        scaling: float | None = None, softcap: float | None = None, rope: RopeTable | None = None,
                        window_tokens: int = WINDOW_TOKENS) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] (any Q) over everything `layer` stores, one window of stored tokens at a
    time (see the module docstring). Returns [B, Q, Hq, D] in query's dtype.

    Per window: on the CPU without softcap, torch's fused flash kernel (output and log-sum-exp, merged across
    windows); otherwise scores, mask and an online softmax in torch."""
    k_stream, v_stream = layer.k, layer.v
    batch, hq, queries, dim = query.shape
    scale = dim ** -0.5 if scaling is None else scaling
    total = k_stream.stored
    heads = _heads(k_stream)
    g0 = hq // heads
    q = query.float().reshape(batch, heads, g0 * queries, dim)
    fused = _use_fused(query, softcap)
    if not fused:
        q = q * scale
    rs = None
    if rope is not None:  # keys stored pre-RoPE: rotate them at their logged positions
        rs = rope.get(layer.layer_idx, layer.first_slot, layer.first_slot + total)
    mask = attention_mask
    if mask is not None and mask.shape[-1] != total:
        mask = mask[..., -total:]
    cuts = sorted(set(k_stream.cuts()) & set(v_stream.cuts()))
    state = (LseMerge if fused else OnlineSoftmax)(batch, heads, g0 * queries, dim, query.device)
    for start, stop in windows(cuts, total, window_tokens):
        k = k_stream.read_range(start, stop, torch.float32)
        if rs is not None:
            k = apply_rope(k, *rs[start:stop].full())
        if fused:
            bias, visible = _window_bias(mask, start, stop - start, total, queries, g0)
            state.add(*_fused_window(q, k, v_stream.read_range(start, stop, torch.float32), bias, visible, scale))
            continue
        s = q @ k.transpose(-1, -2)
        del k
        if softcap:
            s = torch.tanh(s.div_(softcap)).mul_(softcap)
        _mask_window(s.view(batch, heads, g0, queries, stop - start), mask, start, total)
        state.add(s, v_stream.read_range(start, stop, torch.float32))
    out = state.result().view(batch, hq, queries, dim)
    return out.transpose(1, 2).contiguous().to(query.dtype)
