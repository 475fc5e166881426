"""Triton kernels over kvpack's vLLM pages: attention straight from the packed per-token slots, for decode steps and
chunked prefill (the backend's CUDA path; `cuda_read` wires it to the engine's layout and metadata).

One program takes (request x block of BQ query tokens, KV head, split of the context): the GROUP query heads of that
KV head for BQ tokens (rows padded to GP per token, BM rows in all) against its split's share of the request's
cached tokens, BN tokens at a time. BN divides the page size, so a tile of tokens lies in one page. Per tile:
- each token's slot row through the block table (slot = block * block_size + offset in the page);
- each channel's code from two bytes of the slot's bitstream (`SlotPart`'s byte / shift / mask per channel, widths
  <= 8), its level from the channel's codebook (one per layer, head or channel; Q-Norm applied), times the
  per-channel key range or the token's fp16 (zero, scale) pair; raw parts ("fp16" method) read the model's dtype;
- outlier slots (fp16 value + channel index) replace their elements; the page's key-outlier pool (token offset,
  channel, fp16 value) replaces its elements through two one-hot tl.dots per chunk of PE entries (exact: one
  non-zero term per element);
- pre-RoPE keys are rotated by the token's position (cos/sin tables as `RopeTable` holds them, rotate_half halves:
  keys are read as their two halves), then positions < sink_tokens take the exact post-RoPE keys and values of the
  page's sink record;
- causal online softmax (exp2); one split writes the output directly, several write fp32 partials and
  (max + log2 sum) that `_pages_merge_kernel` combines.
No host synchronisation: grids and split sizes come from host-side ints (request count, longest query, longest
context), every data-dependent bound is read on the device. Byte offsets are int64. fp16/bf16/fp32 fields are
assembled from bytes (slots are byte-aligned, not element-aligned). Nothing here imports vLLM.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import torch

from kvpack.integrations.vllm.slots import LayerSlots, SlotPart
from kvpack.kernels import triton_decode as td
from kvpack.kernels.triton_attention import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

RAW_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # how raw fields and sink records are read
MAX_BN = 32  # tokens per tile (at most; a power of two dividing the page size, at least 16)
MIN_DOT = 16  # tl.dot needs 16 rows / columns
POOL_CHUNK = 32  # pool entries per one-hot tl.dot (64: ~70 more registers per thread)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------- host tables
@dataclass
class PartTables:
    """What the kernel reads of one `SlotPart` on one device: int32 [4, C] (first byte of each code, bit offset,
    mask, first level in `levels`), fp32 [2, C] per-channel (zero, scale) (zeros for per-token ranges), fp32 levels
    (Q-Norm applied) and the part's layout scalars."""

    raw: bool
    code_bytes: int
    pairs: int
    pair_div: int
    outliers: int
    index_bytes: int
    nbytes: int
    ints: torch.Tensor
    ranges: torch.Tensor
    levels: torch.Tensor


def part_tables(part: SlotPart, device: torch.device) -> PartTables:
    c = part.channels
    if part.kind == "raw":
        dummy_i, dummy_f = torch.zeros(4, 1, dtype=torch.int32, device=device), torch.zeros(2, 1, device=device)
        return PartTables(True, 0, 0, 1, 0, 1, part.nbytes, dummy_i, dummy_f, torch.zeros(1, device=device))
    codec = part.codec
    levels = codec.decode_levels.float()  # [groups, n]
    groups, n = levels.shape
    ch = torch.arange(c)
    group = ch * 0 if groups == 1 else (ch // part.head_dim if groups == part.heads else ch)
    ints = torch.stack([part._byte.cpu(), part._shift.cpu().long(), part._mask.cpu().long(), group * n]).to(torch.int32)
    if codec.axis == "channel":
        ranges = torch.stack([codec.zero.float().flatten().cpu(), codec.scale.float().flatten().cpu()])
    else:
        ranges = torch.zeros(2, c)
    pair_div = part.head_dim if part.scale_pairs == part.heads else c
    return PartTables(False, part.code_bytes, part.scale_pairs, pair_div, part.outlier_slots, part.index_bytes,
                      part.nbytes, ints.to(device).contiguous(), ranges.to(device).contiguous(),
                      levels.flatten().cpu().to(device).contiguous())


@dataclass
class LayerTables:
    """One layer's parts, sink and pool sizes, and the model dtype's raw kind."""

    key: PartTables
    value: PartTables
    heads: int
    head_dim: int
    slot_bytes: int
    sink_tokens: int
    sink_bytes: int
    pool_entries: int
    pool_bytes: int
    raw_kind: int
    item: int


def layer_tables(layer: LayerSlots, device: torch.device) -> LayerTables:
    dtype = layer.sink_dtype
    if dtype not in RAW_KINDS:
        raise ValueError(f"kvpack pages in {dtype} have no Triton read path (float32, float16, bfloat16 only)")
    for part in (layer.key, layer.value):
        if part.kind == "raw" and part.dtype != dtype:
            raise ValueError(f"raw slots in {part.dtype} with sink records in {dtype}: one model dtype expected")
    return LayerTables(part_tables(layer.key, device), part_tables(layer.value, device), layer.key.heads,
                       layer.key.head_dim, layer.slot_bytes, layer.sink_tokens, layer.sink_bytes, layer.key_pool,
                       layer.pool_bytes, RAW_KINDS[dtype], dtype.itemsize)


def tile_tokens(block_size: int) -> int:
    """BN: the largest power of two dividing the page size, at most MAX_BN; at least 16 (tl.dot)."""
    bn = min(MAX_BN, block_size & -block_size)
    if bn < MIN_DOT:
        raise ValueError(f"kvpack's Triton pages read tiles of 16 tokens inside one page: block_size {block_size} "
                         "is not a multiple of 16")
    return bn


def num_warps(dim: int) -> int:
    """Warps of the attend kernel: 4 at head_dim <= 64, 8 above (ptxas: no spills either way, see
    benchmarks/triton_compile_report.py)."""
    return 4 if dim <= 64 else 8


def plan(requests: int, kv_heads: int, group: int, max_query_len: int, max_seq_len: int, tokens: int,
         heads: int, dim: int, bn: int, splits: int | None = None, sms: int = 132) -> dict:
    """Launch shape from host ints: rows per program (BM = BQ query tokens x GP heads; 16 for decode, 32 for
    prefill: 64 rows spill registers), query blocks per request,
    splits of the context (enough programs to fill `sms` SMs twice, at least 4 tiles per split, partials under
    256 MiB) and the split length (a multiple of BN)."""
    gp = _pow2(group)
    bm = max(MIN_DOT, gp) if max_query_len <= 1 else max(32, gp)
    bq = bm // gp
    qblocks = max(1, math.ceil(max_query_len / bq))
    if splits is None:
        programs = max(1, requests * qblocks * kv_heads)
        by_work = max(1, math.ceil(max_seq_len / (4 * bn)))
        by_memory = max(1, (256 << 20) // max(1, tokens * heads * (dim + 1) * 4))
        splits = max(1, min(math.ceil(2 * sms / programs), by_work, by_memory, 64))
    split_len = math.ceil(math.ceil(max(1, max_seq_len) / splits) / bn) * bn
    return {"GP": gp, "BM": bm, "BQ": bq, "qblocks": qblocks, "splits": splits, "split_len": split_len}


# ---------------------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _u16(p, m):
        """Little-endian uint16 at byte pointers p (masked: 0) -> int32."""
        return tl.load(p, mask=m, other=0).to(tl.int32) | (tl.load(p + 1, mask=m, other=0).to(tl.int32) << 8)

    @triton.jit
    def _f16(p, m):
        """fp16 at byte pointers p -> fp32."""
        return _u16(p, m).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _raw(p, m, KIND: tl.constexpr):
        """A value of the model's dtype (0: fp32, 1: fp16, 2: bf16) at byte pointers p -> fp32."""
        if KIND == 0:
            x = (_u16(p, m) | (_u16(p + 2, m) << 16)).to(tl.float32, bitcast=True)
        elif KIND == 1:
            x = _f16(p, m)
        else:
            x = (_u16(p, m) << 16).to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _part(row, nm, ch, int_ptr, rng_ptr, lev_ptr, C, CODE, PDIV, RAW: tl.constexpr, KIND: tl.constexpr,
              ITEM: tl.constexpr, PAIRS: tl.constexpr, OUT: tl.constexpr, IDXB: tl.constexpr):
        """One slot part of BN tokens: row [BN] byte pointers to the part in each token's slot, nm [BN] the tokens
        to read, ch [W] channels (head * D + d) -> [BN, W] fp32, outlier slots applied."""
        m2 = nm[:, None]
        if RAW:
            x = _raw(row[:, None] + (ch * ITEM)[None, :], m2, KIND)
        else:
            byte = tl.load(int_ptr + ch)
            shift = tl.load(int_ptr + C + ch)
            mask = tl.load(int_ptr + 2 * C + ch)
            first = tl.load(int_ptr + 3 * C + ch)
            p = row[:, None] + byte[None, :]
            word = tl.load(p, mask=m2, other=0).to(tl.int32)
            word = word | (tl.load(p + 1, mask=m2 & (byte + 1 < CODE)[None, :], other=0).to(tl.int32) << 8)
            code = (word >> shift[None, :]) & mask[None, :]
            u = tl.load(lev_ptr + first[None, :] + code)
            if PAIRS > 0:
                pair = (ch // PDIV)[None, :]
                zero = _f16(row[:, None] + CODE + 2 * pair, m2)
                scale = _f16(row[:, None] + CODE + 2 * PAIRS + 2 * pair, m2)
                x = u * scale + zero
            else:
                x = u * tl.load(rng_ptr + C + ch)[None, :] + tl.load(rng_ptr + ch)[None, :]
            if OUT > 0:
                at = CODE + 4 * PAIRS
                for j in range(OUT):
                    val = _f16(row + at + 2 * j, nm)
                    if IDXB == 2:
                        idx = _u16(row + at + 2 * OUT + 2 * j, nm)
                    else:
                        idx = tl.load(row + at + 2 * OUT + j, mask=nm, other=0).to(tl.int32)
                    x = tl.where(ch[None, :] == idx[:, None], val[:, None], x)
        return x

    @triton.jit
    def _pool(prow, off, nm, ch_lo, ch_hi, k_lo, k_hi, ENTRIES: tl.constexpr, PE: tl.constexpr):
        """The page's key-outlier pool (prow: its first byte) put back into keys [BN, HALF] x 2 of the tokens at
        page offsets off [BN]: count, then entries of fp16 value, uint8 offset, uint8 channel."""
        count = tl.minimum(tl.load(prow).to(tl.int32) | (tl.load(prow + 1).to(tl.int32) << 8), ENTRIES)
        for e0 in range(0, count, PE):
            e = e0 + tl.arange(0, PE)
            em = e < count
            ep = prow + 2 + 4 * e
            val = _f16(ep, em)
            eoff = tl.load(ep + 2, mask=em, other=0).to(tl.int32)
            chan = tl.load(ep + 3, mask=em, other=0).to(tl.int32)
            a = ((eoff[None, :] == off[:, None]) & em[None, :] & nm[:, None]).to(tl.float16)  # [BN, PE]
            hit_lo = chan[:, None] == ch_lo[None, :]  # [PE, HALF]
            hit_hi = chan[:, None] == ch_hi[None, :]
            rep_lo = tl.dot(a, tl.where(hit_lo, val[:, None], 0.0).to(tl.float16))
            got_lo = tl.dot(a, hit_lo.to(tl.float16))
            rep_hi = tl.dot(a, tl.where(hit_hi, val[:, None], 0.0).to(tl.float16))
            got_hi = tl.dot(a, hit_hi.to(tl.float16))
            k_lo = tl.where(got_lo > 0.5, rep_lo, k_lo)
            k_hi = tl.where(got_hi > 0.5, rep_hi, k_hi)
        return k_lo, k_hi

    @triton.jit
    def _pages_attend_kernel(
        q_ptr, out_ptr, part_ptr, lse_ptr, slot_ptr, sink_ptr, pool_ptr, bt_ptr, qsl_ptr, len_ptr,
        kint_ptr, krng_ptr, klev_ptr, vint_ptr, vrng_ptr, vlev_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale_log2, block_size, split_len, qblocks,
        SLOT_BYTES, K_BYTES, SINK_BYTES, POOL_BYTES, K_CODE, V_CODE, K_PDIV, V_PDIV,
        H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
        BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PE: tl.constexpr,
        K_RAW: tl.constexpr, V_RAW: tl.constexpr, KIND: tl.constexpr, ITEM: tl.constexpr,
        K_PAIRS: tl.constexpr, V_PAIRS: tl.constexpr, K_OUT: tl.constexpr, V_OUT: tl.constexpr,
        K_IDXB: tl.constexpr, V_IDXB: tl.constexpr, POOL: tl.constexpr, SINK: tl.constexpr,
        PRE_ROPE: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        splits = tl.num_programs(2)
        r = pid // qblocks
        qb = pid % qblocks
        qs = tl.load(qsl_ptr + r).to(tl.int32)
        q_len = tl.load(qsl_ptr + r + 1).to(tl.int32) - qs
        length = tl.load(len_ptr + r).to(tl.int32)
        if qb * BQ < q_len:
            i = tl.arange(0, BM)
            qi = qb * BQ + i // GP
            g = i % GP
            ok = (g < GROUP) & (qi < q_len)
            tok = (qs + qi).to(tl.int64)
            head = kvh * GROUP + g
            qpos = length - q_len + qi
            dl = tl.arange(0, HALF)
            dv = tl.arange(0, D)
            qp = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
            q_lo = tl.load(qp + dl[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            q_hi = tl.load(qp + HALF + dl[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            ctx_end = tl.minimum(length, length - q_len + qb * BQ + BQ)
            start = split * split_len
            stop = tl.minimum(ctx_end, start + split_len)
            kc_lo = kvh * D + dl
            kc_hi = kc_lo + HALF
            vc = kvh * D + dv
            m = tl.full([BM], float("-inf"), tl.float32)
            lsum = tl.zeros([BM], tl.float32)
            acc = tl.zeros([BM, D], tl.float32)
            bt_row = bt_ptr + r.to(tl.int64) * stride_bt
            for n0 in range(start, stop, BN):
                n = n0 + tl.arange(0, BN)
                nm = n < stop
                blk = tl.load(bt_row + n0 // block_size).to(tl.int64)
                off = n % block_size
                row = slot_ptr + (blk * block_size + off) * SLOT_BYTES
                k_lo = _part(row, nm, kc_lo, kint_ptr, krng_ptr, klev_ptr, H * D, K_CODE, K_PDIV, K_RAW, KIND, ITEM,
                             K_PAIRS, K_OUT, K_IDXB)
                k_hi = _part(row, nm, kc_hi, kint_ptr, krng_ptr, klev_ptr, H * D, K_CODE, K_PDIV, K_RAW, KIND, ITEM,
                             K_PAIRS, K_OUT, K_IDXB)
                if POOL > 0:
                    k_lo, k_hi = _pool(pool_ptr + blk * POOL_BYTES, off, nm, kc_lo, kc_hi, k_lo, k_hi, POOL, PE)
                if PRE_ROPE:
                    cp = n.to(tl.int64)[:, None] * D + dl[None, :]
                    c_lo = tl.load(cos_ptr + cp, mask=nm[:, None], other=1.0)
                    c_hi = tl.load(cos_ptr + cp + HALF, mask=nm[:, None], other=1.0)
                    s_lo = tl.load(sin_ptr + cp, mask=nm[:, None], other=0.0)
                    s_hi = tl.load(sin_ptr + cp + HALF, mask=nm[:, None], other=0.0)
                    k_lo, k_hi = k_lo * c_lo - k_hi * s_lo, k_hi * c_hi + k_lo * s_hi
                v = _part(row + K_BYTES, nm, vc, vint_ptr, vrng_ptr, vlev_ptr, H * D, V_CODE, V_PDIV, V_RAW, KIND, ITEM,
                          V_PAIRS, V_OUT, V_IDXB)
                if SINK > 0:
                    if n0 < SINK:
                        sk = nm & (n < SINK)
                        srow = sink_ptr + blk * SINK_BYTES + n.to(tl.int64) * (2 * H * D * ITEM)
                        k_lo = tl.where(sk[:, None], _raw(srow[:, None] + (kc_lo * ITEM)[None, :], sk[:, None], KIND), k_lo)
                        k_hi = tl.where(sk[:, None], _raw(srow[:, None] + (kc_hi * ITEM)[None, :], sk[:, None], KIND), k_hi)
                        v = tl.where(sk[:, None], _raw(srow[:, None] + ((H * D + vc) * ITEM)[None, :], sk[:, None], KIND), v)
                s = tl.dot(q_lo, tl.trans(k_lo), input_precision=PREC)
                s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=PREC) * scale_log2
                s = tl.where(nm[None, :] & (n[None, :] <= qpos[:, None]), s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_use)
                p = tl.exp2(s - m_use[:, None])
                lsum = lsum * alpha + tl.sum(p, 1)
                acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PREC)
                m = m_new
            if DIRECT:
                o = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
                op = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :]
                tl.store(op, o.to(out_ptr.dtype.element_ty), mask=ok[:, None])
            else:
                o = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
                lse = tl.where(lsum > 0, m + tl.log2(tl.where(lsum > 0, lsum, 1.0)), float("-inf"))
                cell = (tok * (H * GROUP) + head) * splits + split  # [T, Hq, S]
                tl.store(lse_ptr + cell, lse, mask=ok)
                tl.store(part_ptr + cell[:, None] * D + dv[None, :], o, mask=ok[:, None])

    @triton.jit
    def _pages_merge_kernel(part_ptr, lse_ptr, out_ptr, stride_ot, stride_oh, splits, HQ: tl.constexpr,
                            D: tl.constexpr, SP: tl.constexpr):
        """out[t, h] = the splits' partials weighted by their softmax mass (grid: tokens, query heads)."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        cell = (t * HQ + h) * splits + s
        sm = s < splits
        lse = tl.load(lse_ptr + cell, mask=sm, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)))
        part = tl.load(part_ptr + cell[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
        total = tl.sum(w, 0)
        o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------- launch
def kernel_constants(t: LayerTables, group: int, gp: int, bq: int, bm: int, bn: int, pre_rope: bool, direct: bool,
                     precision: str = "ieee") -> dict:
    """The constexprs of `_pages_attend_kernel` for a layer (what selects a compiled variant)."""
    k, v = t.key, t.value
    pe = max(MIN_DOT, min(POOL_CHUNK, _pow2(t.pool_entries))) if t.pool_entries else MIN_DOT
    return dict(H=t.heads, D=t.head_dim, HALF=t.head_dim // 2, GROUP=group, GP=gp, BQ=bq, BM=bm, BN=bn, PE=pe,
                K_RAW=k.raw, V_RAW=v.raw, KIND=t.raw_kind, ITEM=t.item, K_PAIRS=k.pairs, V_PAIRS=v.pairs,
                K_OUT=k.outliers, V_OUT=v.outliers, K_IDXB=k.index_bytes, V_IDXB=v.index_bytes, POOL=t.pool_entries,
                SINK=t.sink_tokens, PRE_ROPE=pre_rope, DIRECT=direct, PREC=precision)


def attend_pages(query: torch.Tensor, output: torch.Tensor, slots: torch.Tensor, sinks: torch.Tensor,
                 pools: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, scale: float, block_size: int, max_query_len: int, max_seq_len: int,
                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, splits: int | None = None,
                 precision: str = "ieee") -> torch.Tensor:
    """output [T, Hq, D] <- causal attention (bottom-right aligned, as `read.attend`) of query [T, Hq, D] over the
    pages of every request: slots uint8 [blocks * block_size, slot_bytes], sinks uint8 [blocks, sink_bytes], pools
    uint8 [blocks, pool_bytes] (this layer's `PagePool` rows), block_table int [>= R, max blocks], query_start_loc
    [R + 1] and seq_lens [R] on the device. max_query_len / max_seq_len: host ints bounding the step (no sync).
    cos/sin fp32 [max_len, D] when keys are stored pre-RoPE. precision: tl.dot's ("ieee": exact fp32, "tf32")."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    requests = seq_lens.shape[0]
    tokens, heads, dim = query.shape
    if requests == 0 or tokens == 0:
        return output
    hkv = tables.heads
    group = heads // hkv
    if dim != tables.head_dim or group * hkv != heads or dim & (dim - 1) or dim < 2 * MIN_DOT:
        raise ValueError(f"query of {heads} heads x {dim} over pages of {hkv} KV heads x {tables.head_dim}: need whole "
                         "query groups and a power-of-two head_dim >= 32")
    if query.stride(-1) != 1 or output.stride(-1) != 1:
        raise ValueError("query and output need contiguous head_dim")
    bn = tile_tokens(block_size)
    shape = plan(requests, hkv, group, max_query_len, max_seq_len, tokens, heads, dim, bn, splits)
    direct = shape["splits"] == 1
    pre_rope = cos is not None
    if pre_rope and (cos.shape[-1] != dim or sin.shape != cos.shape):
        raise ValueError(f"pre-RoPE pages need cos/sin [max_len, {dim}] (rotary over the whole head), got "
                         f"{tuple(cos.shape)}")
    dev = query.device
    if direct:
        part = lse = torch.empty(1, device=dev)
    else:
        part = torch.empty(tokens, heads, shape["splits"], dim, device=dev)
        lse = torch.full((tokens, heads, shape["splits"]), float("-inf"), device=dev)  # rows of no request: 0
    one = torch.zeros(1, device=dev)
    k, v = tables.key, tables.value
    consts = kernel_constants(tables, group, shape["GP"], shape["BQ"], shape["BM"], bn, pre_rope, direct, precision)
    grid = (requests * shape["qblocks"], hkv, shape["splits"])
    _pages_attend_kernel[grid](
        query, output, part, lse, slots, sinks, pools, block_table, query_start_loc, seq_lens,
        k.ints, k.ranges, k.levels, v.ints, v.ranges, v.levels, cos if pre_rope else one, sin if pre_rope else one,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1), block_table.stride(0),
        float(scale) * math.log2(math.e), block_size, shape["split_len"], shape["qblocks"],
        tables.slot_bytes, k.nbytes, tables.sink_bytes, tables.pool_bytes, k.code_bytes, v.code_bytes,
        k.pair_div, v.pair_div, num_warps=num_warps(dim), num_stages=1, **consts)
    if not direct:
        _pages_merge_kernel[(tokens, heads)](part, lse, output, output.stride(0), output.stride(1), shape["splits"],
                                             HQ=heads, D=dim, SP=_pow2(shape["splits"]), num_warps=4, num_stages=1)
    return output


# ---------------------------------------------------------------------------------------------------- ahead of time
ATTEND_POINTERS = {"q_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "lse_ptr": "*fp32", "slot_ptr": "*u8",
                   "sink_ptr": "*u8", "pool_ptr": "*u8", "bt_ptr": "*i32", "qsl_ptr": "*i32", "len_ptr": "*i32",
                   "kint_ptr": "*i32", "vint_ptr": "*i32"}


def _signature(fn, constexprs: dict, pointers: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "scale_log2" else "i32"
    return sig


def aot_configs(tables: LayerTables, group: int, block_size: int = 16, pre_rope: bool = True) -> dict[str, tuple]:
    """(function, signature, constexprs, launch) of the page kernels for a layer's tables: decode (one query token,
    split-K), prefill (64-row query blocks, one split) and the merge kernel."""
    bn = tile_tokens(block_size)
    out = {}
    for name, q_len, direct in (("pages_decode", 1, False), ("pages_prefill", 512, True)):
        shape = plan(1, tables.heads, group, q_len, 8192, q_len, group * tables.heads, tables.head_dim, bn, 1)
        consts = kernel_constants(tables, group, shape["GP"], shape["BQ"], shape["BM"], bn, pre_rope, direct)
        out[name] = (_pages_attend_kernel, _signature(_pages_attend_kernel, consts, ATTEND_POINTERS), consts,
                     {"num_warps": num_warps(tables.head_dim), "num_stages": 1})
    consts = dict(HQ=group * tables.heads, D=tables.head_dim, SP=16)
    out["pages_merge"] = (_pages_merge_kernel, _signature(_pages_merge_kernel, consts, {"out_ptr": "*bf16"}), consts,
                          {"num_warps": 4, "num_stages": 1})
    return out


def aot_stats(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 1) -> dict:
    """Compile for sm_`arch` without a GPU (Triton's passes and bundled ptxas); what ptxas allocated."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    stats = td._parse_ptxas(log.getvalue())
    if not stats["registers"]:
        stats = td._ptxas_stats(kernel.asm["ptx"], arch)
    stats.update(shared=kernel.metadata.shared, num_warps=num_warps, num_stages=num_stages,
                 tl_dot="mma" in kernel.asm["ptx"])
    return stats
