"""Compiled read path: attention straight from the packed pages (`kvpack_pages_attention`,
kernels/cpu_kernels/pages.h, built and loaded by `kvpack.kernels.cpu`).

What `read.attend_torch` computes (its reference and fallback), without decoding the whole cache to float32: per
(request, KV head, block of query tokens) the kernel decodes tiles of keys and values from their slots, writes the
page pools' key outliers over them, rotates keys to their positions, puts the exact sink tokens back, and runs an
online-softmax attention for the G query heads sharing the KV head. On AVX-512 a tile is decoded channel-major (16
slots per vector, one table lookup per channel). Requests with more than DENSE_ABOVE new tokens (prefill chunks)
would decode the same keys once per block of queries; they instead get their cached tokens decoded once
(`kvpack_pages_dense`, the same tile code, in the query's dtype) and attend in it: through vLLM's own CPU attention
kernel for a bf16 model (`native_prefill`), else torch's SDPA. The per-channel tables (code byte, shift, mask, level row;
key levels with the per-channel scale and zero folded in) are built once per layer from its `LayerSlots`.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from kvpack.codecs.checks import raise_for_peak
from kvpack.codecs.nuq import outliers_per_side
from kvpack.integrations.vllm import native_prefill
from kvpack.integrations.vllm.layout import EngineLayout
from kvpack.integrations.vllm.pages import PagePool
from kvpack.integrations.vllm.slots import LayerSlots, SlotPart
from kvpack.kernels import cpu
from kvpack.kernels.rope import SplitTables

RAW_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _function():
    lib = cpu.load()
    if lib is None:
        return None
    fn = lib.kvpack_pages_attention
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    return fn


def available() -> bool:
    """The compiled read path can run (the C++ kernels built for this CPU; see `kvpack.kernels.cpu.error()`)."""
    return _function() is not None


def _part(part: SlotPart, offset: int, slot_bytes: int) -> tuple[list, list[int]] | None:
    """(tensors kept alive, the part's 13 arguments), or None if the kernel cannot read it."""
    if part.kind == "raw":
        if part.dtype not in RAW_TYPES:
            return None
        return [], [0, RAW_TYPES[part.dtype], offset, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    # codes are read 4 bytes at a time from their first byte: the slot must hold 3 more bytes after the codes
    if slot_bytes - (offset + part.code_bytes) < 3:
        return None
    codec = part.codec
    levels = codec.decode_levels.float()
    groups, width = levels.shape
    c = torch.arange(part.channels)
    group = c * 0 if groups == 1 else (c // part.head_dim if groups == part.heads else c)
    table = levels[group]  # [H * D, L]
    if codec.axis == "channel":  # fold the per-channel range in: level * scale + zero, as SlotPart.decode computes it
        table = table * codec.scale.flatten().float().unsqueeze(1) + codec.zero.flatten().float().unsqueeze(1)
    table = torch.nn.functional.pad(table, (0, max(0, 16 - width)))  # rows of >= 16 floats: one 16-lane load each
    tensors = [part._byte.to(torch.int32).contiguous(), part._shift.to(torch.int32).contiguous(),
               part._mask.to(torch.int32).contiguous(), (c * table.shape[1]).to(torch.int32),
               table.contiguous().flatten()]
    pair_div = part.head_dim if part.scale_pairs == part.heads else part.channels
    args = [1, 0, offset, part.code_bytes, *(t.data_ptr() for t in tensors), part.scale_pairs, pair_div,
            part.outlier_slots, part.index_bytes]
    return tensors, args


def _layer(parts: LayerSlots, dtype: torch.dtype) -> list[int] | None:
    """The layer's constant arguments (both parts), built once and kept on the LayerSlots with their tensors."""
    cached = parts.__dict__.get("_pages_kernel")
    if cached is None:
        key = _part(parts.key, 0, parts.slot_bytes)
        value = _part(parts.value, parts.key.nbytes, parts.slot_bytes)
        ok = (key is not None and value is not None and parts.key.head_dim % 16 == 0 and parts.key.head_dim <= 256
              and (not parts.sink_tokens or parts.sink_dtype in RAW_TYPES))
        cached = parts.__dict__["_pages_kernel"] = (key[0] + value[0], key[1] + value[1]) if ok else (None, None)
    return cached[1]


def _halves_repeat(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """cos, sin [P, rot] are rotate_half RoPE's: an even rot whose two halves hold the same angles (the channel-major
    path rotates channel i with channel i + rot / 2 by one cos/sin)."""
    half = cos.shape[1] // 2
    return cos.shape[1] % 2 == 0 and torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])


def split_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The channel-major path's RoPE tables (pages.h, Args::rope_hi / rope_lo) of cos, sin [P, rot] (float32): the
    `kvpack.kernels.rope.SplitTables` of 16-position rows, hi [P / 16 + 1, rot] (cos | sin halves at positions 16m),
    and its lo (positions 0..15 over the table's scaling) laid out channel-major, [2 (cos, sin), rot / 2, 16]; or
    None where the kernel cannot compose the table by angle addition (halves that differ, fewer than 16 positions,
    angles that do not add up within float rounding)."""
    rows, rot = cos.shape
    half = rot // 2
    if rows < 16 or not _halves_repeat(cos, sin):
        return None
    scaling = float(cos[0, 0])
    if scaling == 0:
        return None
    at = torch.arange(0, rows + 15, 16).clamp(max=rows - 1)
    tables = SplitTables(torch.cat([cos[at, :half], sin[at, :half]], 1).contiguous(),
                         torch.cat([cos[:16, :half], sin[:16, :half]], 1) / scaling, 4, rot)
    composed_cos, composed_sin = tables.compose(torch.arange(rows))
    error = torch.maximum((composed_cos - cos[:, :half]).abs().max(), (composed_sin - sin[:, :half]).abs().max())
    if float(error) > abs(scaling) * (1e-5 + 4 * 2.0 ** -23 * rows):  # float rounding of position x frequency
        return None
    return tables.hi, tables.lo.view(16, 2, half).permute(1, 2, 0).contiguous()


CHANNEL_MAJOR_ROPE_BYTES = 1 << 20  # a channel-major cos/sin table up to this size is read, a larger one composed


def channel_major(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """cos, sin [P, rot] (float32) laid out as the channel-major path reads them (pages.h, Args::rope_cm):
    [ceil(P / 16), cos (rot / 2 lines of 16 positions) | sin (likewise)], the last block padded with the last row;
    None for halves that differ (not rotate_half RoPE) or a table over CHANNEL_MAJOR_ROPE_BYTES (long contexts: the
    rows a step reads would not stay in the caches; the split tables compose them instead)."""
    rows, rot = cos.shape
    half = rot // 2
    if rows * rot * 4 > CHANNEL_MAJOR_ROPE_BYTES or not _halves_repeat(cos, sin):
        return None
    padded = -(-rows // 16) * 16
    at = torch.arange(padded).clamp(max=rows - 1)
    both = torch.cat([cos[at, :half], sin[at, :half]], 1)  # [padded, rot]
    return both.view(padded // 16, 16, rot).transpose(1, 2).contiguous()


def _rope(layout: EngineLayout) -> list[int]:
    """cos, sin, their row stride, rotated channels, the split tables (0, 0 where there are none; composed from the
    unrounded angles, built once per table), the type the kernel rounds what they compose to (the table's dtype,
    as RAW_TYPES codes it) and the channel-major table (`channel_major` of cos/sin as they are; 0: none)."""
    rope = layout.rope
    if rope is None:
        return [0, 0, 0, 0, 0, 0, 0, 0]
    cos, sin = rope.cos, rope.sin
    if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32 and sin.dtype == torch.float32):
        rope.cos, rope.sin = cos, sin = cos.float().contiguous(), sin.float().contiguous()
    split = rope.__dict__.get("_split_tables")
    if split is None or split[0] is not cos or split[1] is not sin:
        source = rope.exact if rope.exact is not None else (cos, sin)
        split = rope.__dict__["_split_tables"] = (cos, sin, split_tables(*(t.float().contiguous() for t in source)),
                                                  channel_major(cos, sin))
    tables, table = split[2], split[3]
    hi, lo = (tables[0].data_ptr(), tables[1].data_ptr()) if tables is not None else (0, 0)
    return [cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.shape[1], hi, lo, RAW_TYPES[rope.dtype],
            table.data_ptr() if table is not None else 0]


def _arguments(layout: EngineLayout, pool: PagePool, layer: int, first: int, second: int, requests: int, heads: int,
               group: int, scale: float, qsl: torch.Tensor, seq_lens: torch.Tensor, table: torch.Tensor,
               constant: list[int], max_query: int) -> list[int]:
    """The argument array shared by `kvpack_pages_attention` (first, second: query, out) and `kvpack_pages_dense`
    (K, V outputs)."""
    parts = layout.layers[layer]
    sink = parts.sink_tokens
    return [first, second, requests, heads, group, parts.key.head_dim, max(1, torch.get_num_threads()),
            cpu._float_bits(scale), qsl.data_ptr(), seq_lens.data_ptr(), table.data_ptr(), table.stride(0),
            pool.block_size, pool.slots[layer].data_ptr(), parts.slot_bytes,
            pool.sinks[layer].data_ptr() if sink else 0, sink, RAW_TYPES.get(parts.sink_dtype, 0),
            pool.pools[layer].data_ptr() if parts.key_pool else 0, parts.key_pool, *_rope(layout), *constant, max_query]


def attend(layout: EngineLayout, pool: PagePool, layer: int, query: torch.Tensor, metadata, scale: float,
           output: torch.Tensor) -> bool:
    """`read.attend_torch` through the C++ kernels; False (nothing written) when they are unavailable or cannot read
    this layer, so the caller falls back. Requests with at most DENSE_ABOVE new tokens (decode, short chunks) attend
    straight from the pages in one call; longer prefills get their cached tokens decoded once (`dense`) and attend in
    the query's dtype (vLLM's own kernel for a bf16 model, else torch's SDPA)."""
    fn = _function()
    if fn is None or query.device.type != "cpu":
        return False
    parts = layout.layers[layer]
    constant = _layer(parts, layout.dtype)
    if constant is None:
        return False
    qsl = metadata.query_start_loc.to(torch.int64).contiguous()
    seq_lens = metadata.seq_lens.to(torch.int64).contiguous()
    requests = seq_lens.numel()
    if requests == 0:
        return True
    heads, dim = parts.key.heads, parts.key.head_dim
    tokens, hq = query.shape[0], query.shape[1]
    if hq % heads or query.shape[2] != dim:
        return False
    table = metadata.block_table[:requests]
    if table.dtype != torch.int32 or table.stride(-1) != 1:
        table = table.to(torch.int32).contiguous()
    lengths = qsl[1:] - qsl[:-1]
    long = (lengths > DENSE_ABOVE).nonzero().flatten().tolist()
    if len(long) < requests:
        q = query if query.dtype == torch.float32 and query.is_contiguous() else query.float().contiguous()
        direct = output.dtype == torch.float32 and output.is_contiguous()
        out = output if direct else torch.empty(tokens, hq, dim, dtype=torch.float32)
        array = cpu._int64s(_arguments(layout, pool, layer, q.data_ptr(), out.data_ptr(), requests, heads, hq // heads,
                                       scale, qsl, seq_lens, table, constant, DENSE_ABOVE))
        code = fn(array.buffer_info()[0])
        if code != 0:
            raise RuntimeError(f"kvpack_pages_attention rejected its arguments (code {code})")
        if not direct:  # a bf16 model's output: the short requests' rows converted in one op, not per request
            n = int(qsl[-1])
            if not long:
                output[:n].copy_(out[:n])
            else:
                rows = torch.repeat_interleave(lengths <= DENSE_ABOVE, lengths)
                output[:n][rows] = out[:n][rows].to(output.dtype)
    if long:
        _attend_dense(layout, pool, layer, query, long, qsl, seq_lens, table, constant, scale, output)
    return True


DENSE_ABOVE = 16  # requests with more new tokens than this (prefill chunks) attend through `dense`


def dense(layout: EngineLayout, pool: PagePool, layer: int, seq_lens: torch.Tensor, table: torch.Tensor,
          constant: list[int], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE keys and values [sum(seq_lens), Hkv, D] of the requests (seq_lens int64, table int32 rows), decoded
    from their pages as the attention kernel reads them (`kvpack_pages_dense`), in `dtype` (float32, or float16 /
    bfloat16 rounded to nearest even as .to(dtype) rounds the float32 ones)."""
    parts = layout.layers[layer]
    heads, dim = parts.key.heads, parts.key.head_dim
    total = int(seq_lens.sum())
    keys = torch.empty(total, heads, dim, dtype=dtype)
    values = torch.empty(total, heads, dim, dtype=dtype)
    qsl = torch.zeros(seq_lens.numel() + 1, dtype=torch.int64)
    fn = cpu.load().kvpack_pages_dense
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    array = cpu._int64s(_arguments(layout, pool, layer, keys.data_ptr(), values.data_ptr(), seq_lens.numel(), heads, 1,
                                   1.0, qsl, seq_lens, table, constant, 0) + [RAW_TYPES[dtype]])
    code = fn(array.buffer_info()[0])
    if code != 0:
        raise RuntimeError(f"kvpack_pages_dense rejected its arguments (code {code})")
    return keys, values


def _attend_dense(layout: EngineLayout, pool: PagePool, layer: int, query: torch.Tensor, which: list[int],
                  qsl: torch.Tensor, seq_lens: torch.Tensor, table: torch.Tensor, constant: list[int], scale: float,
                  output: torch.Tensor) -> None:
    """output rows of the requests `which`: causal (bottom-right aligned) attention over their decoded pages, by
    vLLM's own CPU kernel where `native_prefill` takes the model (staged in its scratch cache), else torch's SDPA
    request by request; either way over the pages decoded once, in the model's dtype."""
    index = torch.tensor(which)
    lens = seq_lens[index].contiguous()
    dtype = query.dtype if query.dtype in RAW_TYPES else torch.float32
    keys, values = dense(layout, pool, layer, lens, table[index].contiguous(), constant, dtype)
    if native_prefill.usable(query.dtype, layout.layers[layer].key.head_dim):
        starts = qsl.tolist()
        q_lens = [starts[r + 1] - starts[r] for r in which]
        if which == list(range(which[0], which[-1] + 1)):  # one run of requests (vLLM puts prefills last): a slice
            rows = slice(starts[which[0]], starts[which[-1] + 1])
        else:
            rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in which])
        sc = native_prefill.stage(keys, values, lens.tolist())
        out = native_prefill.run(query[rows], sc, q_lens, scale) if sc is not None else None
        if out is not None:
            output[rows] = out.to(output.dtype)
            return
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    at = 0
    for r, length in zip(which, lens.tolist()):
        qs, qe = int(qsl[r]), int(qsl[r + 1])
        q = query[qs:qe].transpose(0, 1).unsqueeze(0)  # [1, Hq, q, D]
        k = keys[at: at + length].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        v = values[at: at + length].transpose(0, 1).unsqueeze(0)
        at += length
        if qe - qs == length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            allowed = torch.arange(length).unsqueeze(0) <= (length - (qe - qs) + torch.arange(qe - qs)).unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
        output[qs:qe] = out[0].transpose(0, 1).to(output.dtype)


# ----- write path -----
def _encoder(part: SlotPart, offset: int) -> tuple[list, list[int]] | None:
    """(tensors kept alive, the 15 encoder arguments of a nuq part), or None if the C++ writer does not cover it."""
    codec = part.codec
    if part.kind != "nuq" or codec._matrix_outliers or part.channels > 4096 or codec.bits > 8:
        return None
    token = codec.axis == "token"
    if not token and part.scale_pairs:
        return None
    levels = codec.levels.float()
    groups = levels.shape[0]
    c = torch.arange(part.channels)
    group = c * 0 if groups == 1 else (c // part.head_dim if groups == part.heads else c)
    mid = ((levels[:, 1:] + levels[:, :-1]) / 2)[group].contiguous()  # as kmeans.assign / assign_batched
    if token:
        zero = scale = None
        per = part.channels // part.scale_pairs
        k_side = outliers_per_side(codec.outlier_frac, per) if codec.outlier_frac > 0 else 0
    else:
        zero, scale = codec.zero.flatten().float().contiguous(), codec.scale.flatten().float().contiguous()
        k_side = 0
    tensors = [part._byte.to(torch.int32).contiguous(), part._shift.to(torch.int32).contiguous(),
               part._mask.to(torch.int32).contiguous(), mid]
    keep = tensors + [t for t in (zero, scale) if t is not None]
    args = [int(token), offset, part.code_bytes, *(t.data_ptr() for t in tensors), mid.shape[1],
            0 if zero is None else zero.data_ptr(), 0 if scale is None else scale.data_ptr(), int(codec.outlier_frac > 0),
            k_side, part.scale_pairs if token else 1, part.outlier_slots, part.index_bytes]
    return keep, args


def _writer(parts: LayerSlots) -> list[int] | None:
    cached = parts.__dict__.get("_pages_writer")
    if cached is None:
        key, value = _encoder(parts.key, 0), _encoder(parts.value, parts.key.nbytes)
        ok = (key is not None and value is not None and parts.key.codec.axis == "channel"
              and parts.value.codec.axis == "token" and parts.key.head_dim <= 256)
        cached = parts.__dict__["_pages_writer"] = (key[0] + value[0], key[1] + value[1]) if ok else (None, None)
    return cached[1]


def write(layout: EngineLayout, pool: PagePool, layer: int, key: torch.Tensor, value: torch.Tensor,
          slots: torch.Tensor, positions: torch.Tensor, check: tuple[str, str] | None = None) -> int | None:
    """Slots and key-outlier pools of tokens [T, H, D] (keys post-RoPE as vLLM hands them, in the model's dtype, no
    padding) in one C++ call, as `SlotPart.encode` + `outlier_pool.write_pool` write them after
    `layout.rope.unrotate` (pre-RoPE pages: the keys are rotated back in the same call, with the same float32
    arithmetic, from the inputs widened to float32 exactly); the key outliers clamped, or None (the caller writes
    with torch) when the kernels are unavailable or do not cover this layer's parts. Sink records are not written.
    `check` = (keys' name, values' name): the same pass takes their peak |x| and, where one is NaN, inf or beyond
    fp16's range, nothing is written and `check_storable`'s error is raised, naming the tensor."""
    lib = cpu.load()
    if lib is None or key.device.type != "cpu":
        return None
    parts = layout.layers[layer]
    constant = _writer(parts)
    if constant is None:
        return None
    fn = lib.kvpack_pages_write
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int64
    tokens, heads, dim = key.shape
    dtype = key.dtype if key.dtype in RAW_TYPES and value.dtype == key.dtype else torch.float32
    k = key.to(dtype).contiguous().view(tokens, -1)
    v = value.to(dtype).contiguous().view(tokens, -1)
    peaks = torch.zeros(2, dtype=torch.float32) if check else None
    s = slots.to(torch.int64).contiguous()
    p = positions.to(torch.int64).contiguous()
    pooled = parts.key_pool > 0
    args = [k.data_ptr(), v.data_ptr(), tokens, heads, dim, max(1, torch.get_num_threads()), s.data_ptr(), p.data_ptr(),
            pool.slots[layer].data_ptr(), parts.slot_bytes, pool.block_size,
            pool.pools[layer].data_ptr() if pooled else 0, parts.key_pool, parts.sink_tokens, *_rope(layout)[:4],
            *constant, RAW_TYPES[dtype], peaks.data_ptr() if check else 0]
    array = cpu._int64s(args)
    clamped = fn(array.buffer_info()[0])
    if clamped == -3 and check:
        for peak, what in zip(peaks.tolist(), check):
            raise_for_peak(peak, what)
    if clamped < 0:
        raise RuntimeError(f"kvpack_pages_write rejected its arguments (code {clamped})")
    return int(clamped)
