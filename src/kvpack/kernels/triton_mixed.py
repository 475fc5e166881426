"""Split-K decode attention over runs of per-channel mixed-width nuq blocks (the kvpack presets), on the GPU.

One launch per run pair (keys, values) inside triton_decode's layer pass; the same partials and reduction as the
single-width kernel. What the kernel reads is a layout description built once per codec (`WidthTables`), from the
run's kernel view (kernels.layout.mixed_view: width groups, their columns, levels and ranges):

- storage: one packed tensor per width w, codes{w} [blocks * B, T * n_w * w / 8], token-major; a token row holds
  the n_w codes of that width of every head in column order, so one head's channels of one width are contiguous;
- permuted order: per head, its channels sorted by width (each width contiguous); channel j of head h
  has a natural channel chan[h, j], a width, a slot (which codes tensor), a bit offset inside the token row and
  the row's bytes. Codes are read two bytes at a time (a code of <= 8 bits spans at most two), any alignment;
- levels: per head one compact fp32 table, each channel's 2**width decoded levels in permuted order (key tables
  hold level * scale + zero: the per-channel range folded in, the same fp32 ops as NuqCodec.decode), read by
  per-element gathers from L1. Not shared memory: the shipped presets hold up to 7 widths and up to ~6000 levels
  per head (24 KB fp32 a side), which a gather table staged through registers cannot hold without spills;
- RoPE on pre-RoPE keys without moving channels: q . RoPE(k) = sum_j k_j (A_j cos_j + B_j sin_j) with
  A_j = q[chan_j], B_j = +-q[partner of chan_j] and the angle of chan_j mod D/2, so scores are two tl.dots,
  A @ (k * cos) + B @ (k * sin), and RoPE pairs need not share a width;
- outliers (codecs.sparse rows, token_all or token_head) replace the decoded element at the permuted position
  inv[h, channel];
- values: acc^T [D, GP] in the values' permuted order, written to natural channels with the partials.

No host sync, launch grids from shapes only (CUDA graphs), int64 offsets. Widths 1..8 (one codes tensor each,
MAX_SLOTS); anything else returns None (the caller takes another path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.kernels.layout import MixedNuqView, mixed_view
from kvpack.kernels.triton_attention import HAVE_TRITON
from kvpack.kernels import triton_device
from kvpack.kernels.triton_device import cell_pointers

if HAVE_TRITON:
    import triton
    import triton.language as tl

    _cos_sin_at, _dot, _mask_scores = triton_device._cos_sin_at, triton_device._dot, triton_device._mask_scores
    _online, _outlier, _outlier_rows = triton_device._online, triton_device._outlier, triton_device._outlier_rows

MAX_SLOTS = 8  # widths per codec the kernel reads (one codes tensor each): every width 1..8


def launch(dim: int) -> dict:
    """Launch options: twice the warps of the single-width kernel (a [D, 16] tile of per-element byte gathers is
    twice its [D / 2, 16] halves), at most 128 registers; checked free of spills by tests/test_triton_compile.py."""
    return {"num_warps": 8 if dim <= 64 else 16, "num_stages": 1, "maxnreg": 128}


@dataclass
class WidthTables:
    """The permuted channel order of one mixed-width codec on one device, built once per codec.

    meta int32 [H, 5, D]: natural channel, width | slot << 4, bit offset in the token row, token row bytes, first
    level in the head's table. inv int32 [H, D]: permuted position of natural channel c. levels fp32 [H, L]: per
    head the 2**width decoded levels of each channel one after another (keys: times the channel's scale plus its
    zero), L the most any head needs. slots = number of widths."""

    meta: torch.Tensor
    inv: torch.Tensor
    levels: torch.Tensor
    slots: int


def width_tables(codec, view: MixedNuqView, keys: bool) -> WidthTables | None:
    """The tables of `codec` from a run's view of its width groups, built once per codec and device (kept with the
    codec's other kernel constants: `Codec.to` drops them); None when the widths do not fit the kernel."""
    groups = view.groups
    if not groups or len(groups) > MAX_SLOTS or any(not 1 <= g.bits <= 8 for g in groups):
        return None
    memo = codec.__dict__.setdefault("_kvpack_triton_tables", {})
    levels = groups[0].codec.level_data  # what the tables are built from (the padded `levels` is built per ask)
    key = (keys, str(groups[0].codes.device), id(levels), levels._version)
    if key not in memo:
        memo[key] = _build_tables(view, keys)
    return memo[key]


def _build_tables(view: MixedNuqView, keys: bool) -> WidthTables | None:
    heads, dim = view.heads, view.dim
    dev = view.groups[0].codes.device
    meta = torch.zeros(heads, 5, dim, dtype=torch.int64)
    parts: list[list[torch.Tensor]] = [[] for _ in range(heads)]  # per head, per permuted channel: its levels
    fill = [0] * heads
    for slot, g in enumerate(view.groups):
        cols = g.cols.long().cpu()
        lev = g.levels.float()
        if keys:
            if g.scale is None or g.zero is None:
                return None
            lev = lev * g.scale[:, None] + g.zero[:, None]  # the fp32 ops of NuqCodec.decode, once
        lev = lev.cpu()
        for h in range(heads):
            idx = ((cols // dim) == h).nonzero().flatten()  # positions inside the group (token row) of head h
            j = torch.arange(fill[h], fill[h] + idx.numel())
            meta[h, 0, j] = cols[idx] % dim
            meta[h, 1, j] = g.bits | slot << 4
            meta[h, 2, j] = idx * g.bits
            meta[h, 3, j] = cols.numel() * g.bits // 8
            meta[h, 4, j] = sum(p.numel() for p in parts[h]) + torch.arange(idx.numel()) * (1 << g.bits)
            parts[h].append(lev[idx].reshape(-1))
            fill[h] += idx.numel()
    if fill != [dim] * heads:
        return None
    flat = [torch.cat(p) for p in parts]
    levels = torch.zeros(heads, max(f.numel() for f in flat))
    for h, f in enumerate(flat):
        levels[h, : f.numel()] = f
    inv = torch.argsort(meta[:, 0], dim=1)
    return WidthTables(meta.to(torch.int32).to(dev).contiguous(), inv.to(torch.int32).to(dev).contiguous(),
                       levels.to(dev).contiguous(), len(view.groups))


if HAVE_TRITON:

    @triton.jit
    def _slot_base(slot, c0, c1, c2, c3, c4, c5, c6, c7):
        """The codes tensor of each channel's width: slot [D] -> pointers [D]."""
        lo = tl.where(slot == 0, c0, tl.where(slot == 1, c1, tl.where(slot == 2, c2, c3)))
        hi = tl.where(slot == 4, c4, tl.where(slot == 5, c5, tl.where(slot == 6, c6, c7)))
        return tl.where(slot < 4, lo, hi)

    @triton.jit
    def _mixed_lookup(meta_row, c0, c1, c2, c3, c4, c5, c6, c7, lev_row, r, nmask, n0, n_end, D: tl.constexpr):
        """Decoded levels [D, BN] fp32 of token rows r [BN] (int64: (block * B + b) * T + t) in permuted order.

        meta_row: the head's int32 [5, D] meta; lev_row: its compact level table. The meta is read here on every
        call (L1-resident) rather than kept in registers across the token loop (per-channel values cost one
        register per row a thread holds, for the whole loop); a mask on the loop position (always true: n0 < n_end)
        keeps the compiler from hoisting these loads. Levels are gathered from the head's table (L1-resident: up
        to a few thousand fp32 per head for the shipped presets, too many to stage through registers)."""
        j = tl.arange(0, D)
        keep = j + n0 < n_end + D
        ws = tl.load(meta_row + D + j, mask=keep, other=0)
        bitoff = tl.load(meta_row + 2 * D + j, mask=keep, other=0)
        rowbytes = tl.load(meta_row + 3 * D + j, mask=keep, other=0)
        first = tl.load(meta_row + 4 * D + j, mask=keep, other=0)
        width = ws & 15
        shift = (bitoff & 7)[:, None]
        base = _slot_base(ws >> 4, c0, c1, c2, c3, c4, c5, c6, c7)
        ptr = base[:, None] + (r[None, :] * rowbytes[:, None] + (bitoff >> 3)[:, None])
        m = nmask[None, :]
        lo = tl.load(ptr, mask=m, other=0).to(tl.int32)
        hi = tl.load(ptr + 1, mask=m & (shift + width[:, None] > 8), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift) & ((1 << width[:, None]) - 1)
        return tl.load(lev_row + first[:, None] + code, mask=m, other=0.0)

    @triton.jit
    def _perm_outliers(x, ptr_ptr, pos_ptr, val_ptr, inv_row, cell, nmask, base_c, D: tl.constexpr):
        """x [D, BN] (permuted order) with the stored outliers of cells `cell` [BN] put in place."""
        first, last, count = _outlier_rows(ptr_ptr, cell, nmask)
        rows = tl.arange(0, D)[:, None]
        for i in range(0, count):
            ok, c, val = _outlier(pos_ptr, val_ptr, first, last, i, nmask, base_c)
            at = tl.load(inv_row + c, mask=ok, other=-1)
            x = tl.where(ok[None, :] & (rows == at[None, :]), val[None, :], x)
        return x

    @triton.jit
    def _load_q_perm(q_ptr, sq_b, sq_h, sq_q, scaling, b, h, chan, G: tl.constexpr, GP: tl.constexpr,
                     Q: tl.constexpr, G0: tl.constexpr, HALF: tl.constexpr, DOT16: tl.constexpr):
        """The scaled query rows of KV head h in the keys' permuted order: A [GP, D] = q[chan], B [GP, D] =
        q[chan + HALF] for chan < HALF, -q[chan - HALF] otherwise (so q . RoPE(k) = A (k cos) + B (k sin))."""
        g = tl.arange(0, GP)
        row = q_ptr + b.to(tl.int64) * sq_b + (h * G0 + g // Q).to(tl.int64) * sq_h + (g % Q) * sq_q
        m = (g < G)[:, None]
        low = chan < HALF
        a = tl.load(row[:, None] + chan[None, :], mask=m, other=0.0).to(tl.float32) * scaling
        bq = tl.load(row[:, None] + tl.where(low, chan + HALF, chan - HALF)[None, :], mask=m, other=0.0)
        bq = bq.to(tl.float32) * tl.where(low, scaling, -scaling)[None, :]
        if DOT16:
            a = a.to(tl.float16)
            bq = bq.to(tl.float16)
        return a, bq

    @triton.jit
    def _mixed_split_kernel(
            q_ptr, sq_b, sq_h, sq_q, scaling,
            kc0, kc1, kc2, kc3, kc4, kc5, kc6, kc7, kmeta_ptr, klev_ptr, klev_h, kinv_ptr, TK, ko_ptr, ko_pos, ko_val,
            vc0, vc1, vc2, vc3, vc4, vc5, vc6, vc7, vmeta_ptr, vlev_ptr, vlev_h, vinv_ptr, TV, vs_ptr, vz_ptr, ss_blk, ss_b, ss_h, ss_t,
            vo_ptr, vo_pos, vo_val,
            pos_ptr, sp_b, sp_t, freq_ptr, rope_scale,
            mask_ptr, sm_b, sm_q, sm_k,
            acc_ptr, ml_ptr,
            N, B, H, start, total, split0, per_split, softcap,
            D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, Q: tl.constexpr, G0: tl.constexpr,
            KO: tl.constexpr, VO: tl.constexpr, ROPE: tl.constexpr,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT16: tl.constexpr,
            BLOCK: tl.constexpr):
        """Partials of one (batch, KV head) x one split of a run pair of mixed-width nuq blocks (keys per channel,
        values per token), see the module docstring. Tiles are channel-major [D, BLOCK] in permuted order."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // H
        h = pid % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        j = tl.arange(0, D)
        kmeta = kmeta_ptr + h * 5 * D
        vmeta = vmeta_ptr + h * 5 * D
        kchan = tl.load(kmeta + j)
        q_a, q_b = _load_q_perm(q_ptr, sq_b, sq_h, sq_q, scaling, b, h, kchan, G, GP, Q, G0, HALF, DOT16)
        klev = klev_ptr + h * klev_h
        vlev = vlev_ptr + h * vlev_h
        pos_row = pos_ptr + b64 * sp_b
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([D, GP], dtype=tl.float32)  # acc^T, values' permuted order
        n_begin = sp * per_split
        n_end = tl.minimum(n_begin + per_split, N)
        for n0 in range(n_begin, n_end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nmask = n < n_end
            slot = start + n
            # keys [D, BLOCK]: levels (range folded in), outliers, RoPE folded into the query rows; scores
            kr = ((n // TK).to(tl.int64) * B + b64) * TK + n % TK
            k = _mixed_lookup(kmeta, kc0, kc1, kc2, kc3, kc4, kc5, kc6, kc7, klev, kr, nmask, n0, n_end, D)
            if KO == 1:  # rows (blk, b, t) over h * D + c: pointers per (row, head)
                k = _perm_outliers(k, ko_ptr, ko_pos, ko_val, kinv_ptr + h * D, kr * H + h64, nmask, h * D, D)
            if KO == 2:  # rows (blk, b, h, t) over c
                k = _perm_outliers(k, ko_ptr, ko_pos, ko_val, kinv_ptr + h * D,
                                   ((n // TK).to(tl.int64) * B + b64) * H * TK + h64 * TK + n % TK, nmask, 0, D)
            s = tl.zeros([GP, BLOCK], dtype=tl.float32)
            if ROPE:
                p_t = tl.load(pos_row + slot.to(tl.int64) * sp_t, mask=nmask, other=0).to(tl.float32)
                fj = tl.load(kmeta + j, mask=j + n0 < n_end + D, other=0) % HALF  # in the loop: not held in registers
                c, si = _cos_sin_at(tl.load(freq_ptr + fj), p_t, rope_scale)
                s = _dot(q_a, k * c, s, DOT16)
                s = _dot(q_b, k * si, s, DOT16)
            else:
                s = _dot(q_a, k, s, DOT16)
            s = _mask_scores(s, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP, Q, MASK, CAUSAL,
                             SOFTCAP)
            p, m, l, alpha = _online(s, m, l)
            acc = acc * alpha[None, :]
            # values [D, BLOCK]: levels * scale + zero (per token), outliers; acc^T += v^T p^T
            vb = (n // TV).to(tl.int64)
            vt = n % TV
            vr = (vb * B + b64) * TV + vt
            srow = vb * ss_blk + b64 * ss_b + h64 * ss_h + vt * ss_t
            vs = tl.load(vs_ptr + srow, mask=nmask, other=0.0).to(tl.float32)[None, :]
            vz = tl.load(vz_ptr + srow, mask=nmask, other=0.0).to(tl.float32)[None, :]
            v = _mixed_lookup(vmeta, vc0, vc1, vc2, vc3, vc4, vc5, vc6, vc7, vlev, vr, nmask, n0, n_end, D) * vs + vz
            if VO == 1:
                v = _perm_outliers(v, vo_ptr, vo_pos, vo_val, vinv_ptr + h * D, vr * H + h64, nmask, h * D, D)
            if VO == 2:
                v = _perm_outliers(v, vo_ptr, vo_pos, vo_val, vinv_ptr + h * D, (vb * B + b64) * H * TV + h64 * TV + vt,
                                   nmask, 0, D)
            acc = _dot(v, p, acc, DOT16)
        # partials: acc [S, BH, GP, D] at natural channels, ml [S, BH, 2, GP]
        g = tl.arange(0, GP)
        cell = (split0 + sp).to(tl.int64) * (B * H) + pid
        vchan = tl.load(vmeta + j)
        tl.store(acc_ptr + (cell * GP + g)[None, :] * D + vchan[:, None], acc)
        tl.store(ml_ptr + cell * 2 * GP + g, m)
        tl.store(ml_ptr + cell * 2 * GP + GP + g, l)


def _side_args(run, view: MixedNuqView, tables: WidthTables) -> tuple[list, list, int]:
    """([code tensors x MAX_SLOTS], [cell pointers, positions, values], outlier mode 0/1/2) of one run."""
    codes = [g.codes for g in view.groups]
    codes += [codes[0]] * (MAX_SLOTS - len(codes))
    o = view.outliers
    if o is None or o.values.numel() == 0:
        dummy = tables.meta.new_zeros(1)
        return codes, [dummy, dummy, dummy], 0
    return codes, [cell_pointers(run, view), o.positions, o.values], o.mode


def pair_args(k_run, v_run, key_codec, value_codec, pb) -> tuple[list, dict] | None:
    """Launch arguments and constexprs of `_mixed_split_kernel` for a (keys run, values run) pair of mixed-width
    blocks covering the same tokens (pb: triton_decode.Problem), or None if no kernel fits."""
    kv, vv = mixed_view(k_run, key_codec), mixed_view(v_run, value_codec)
    if kv is None or vv is None or kv.axis != "channel" or vv.axis != "token" or vv.vscale is None:
        return None
    for view in (kv, vv):
        if (view.heads, view.dim, view.batch) != (pb.heads, pb.dim, pb.batch):
            return None
    kt, vt = width_tables(key_codec, kv, True), width_tables(value_codec, vv, False)
    if kt is None or vt is None:
        return None
    kcodes, ko, ko_mode = _side_args(k_run, kv, kt)
    vcodes, vo, vo_mode = _side_args(v_run, vv, vt)
    ss = list(vv.vscale.stride())
    if vv.vscale.shape[2] == 1:
        ss[2] = 0
    args = [*kcodes, kt.meta, kt.levels, kt.levels.shape[1], kt.inv, kv.tokens, *ko,
            *vcodes, vt.meta, vt.levels, vt.levels.shape[1], vt.inv, vv.tokens, vv.vscale, vv.vzero, *ss, *vo]
    return args, dict(KO=ko_mode, VO=vo_mode)
