"""Helpers shared by the split-K decode kernels (triton_decode: nuq and fp16 segments; triton_mixed: the per-channel
mixed-width presets): on the device, code-table lookups, sparse outliers, RoPE angles, masks, online softmax and
partials; on the host, the per-cell CSR pointers of a run's outliers (`cell_pointers`).

Shapes follow the kernels: a tile of keys or values is channel-major [channels, BN] (BN tokens), scores are
[GP, BN] (GP padded query rows), the value accumulator is acc^T [channels, GP] fp32.
"""
from __future__ import annotations

import torch

from kvpack.kernels.triton_attention import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lookup(levels, codes, A: tl.constexpr, C: tl.constexpr):
        """levels [L] at codes [A, C] -> [A, C] fp32 (the table goes to shared memory)."""
        return tl.reshape(tl.gather(levels, tl.reshape(codes, [A * C]), 0), [A, C])

    @triton.jit
    def _outlier_rows(ptr_ptr, cell, nmask):
        """Entries [first, last) [BN] of this head's outliers of cells `cell` [BN] (CSR pointers over (row, head) or
        rows) and the most any one cell holds."""
        first = tl.load(ptr_ptr + cell, mask=nmask, other=0)
        last = tl.load(ptr_ptr + cell + 1, mask=nmask, other=0)
        return first, last, tl.max(tl.where(nmask, last - first, 0), 0)

    @triton.jit
    def _outlier(pos_ptr, val_ptr, first, last, j, nmask, base_c):
        """The j-th outlier of each cell: (ok [BN], channel [BN], value [BN] fp32)."""
        idx = first + j
        ok = nmask & (idx < last)
        c = tl.load(pos_ptr + idx, mask=ok, other=0).to(tl.int32) - base_c
        val = tl.load(val_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        return ok, c, val

    @triton.jit
    def _cos_sin(r):
        """cos, sin of r in [-pi, pi] (Taylor to degree 18/17: error < 4e-8 there, no branches, no local memory)."""
        r2 = r * r
        c = 1.0 + r2 * (-1 / 2 + r2 * (1 / 24 + r2 * (-1 / 720 + r2 * (1 / 40320 + r2 * (-1 / 3628800 + r2 * (
            1 / 479001600 + r2 * (-1 / 87178291200 + r2 * (1 / 20922789888000 + r2 * (-1 / 6402373705728000)))))))))
        s = r * (1.0 + r2 * (-1 / 6 + r2 * (1 / 120 + r2 * (-1 / 5040 + r2 * (1 / 362880 + r2 * (-1 / 39916800 + r2 * (
            1 / 6227020800 + r2 * (-1 / 1307674368000 + r2 * (1 / 355687428096000)))))))))
        return c, s

    @triton.jit
    def _dot(a, b, acc, DOT16: tl.constexpr):
        """acc + a @ b (fp16 operands on tensor cores, or exact fp32)."""
        if DOT16:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        return acc

    @triton.jit
    def _softmax_step(s, m, l, acc_lo, acc_hi):
        """Online softmax: (p^T [BN, GP] against the new max, new m, l, rescaled acc^T [HALF, GP] x 2)."""
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        return tl.trans(p), m_new, l * alpha + tl.sum(p, 1), acc_lo * alpha[None, :], acc_hi * alpha[None, :]

    @triton.jit
    def _store_partial(acc_ptr, ml_ptr, split, pid, BH, m, l, acc_lo, acc_hi, GP: tl.constexpr, HALF: tl.constexpr):
        """Partials of program (split, pid): acc [S, BH, GP, D] fp32 (from acc^T [HALF, GP] x 2), ml [S, BH, 2, GP]
        fp32 (max, sum)."""
        g = tl.arange(0, GP)
        dh = tl.arange(0, HALF)
        cell = split.to(tl.int64) * BH + pid
        arow = acc_ptr + (cell * GP + g)[None, :] * (2 * HALF) + dh[:, None]
        tl.store(arow, acc_lo)
        tl.store(arow + HALF, acc_hi)
        tl.store(ml_ptr + cell * 2 * GP + g, m)
        tl.store(ml_ptr + cell * 2 * GP + GP + g, l)

    @triton.jit
    def _cos_sin_at(freq, p, rope_scale):
        """cos, sin [C, BN] (times rope_scale) of the angles freq [C] x p [BN], reduced to [-pi, pi] first."""
        ang = freq[:, None] * p[None, :]
        turns = tl.floor(ang * 0.15915494309189535 + 0.5)  # 2 pi = 6.28125 + 1.93530718e-3 (exact first part)
        r = ang - turns * 6.28125
        r = r - turns * 1.9353071795864769e-03
        c, s = _cos_sin(r)
        return c * rope_scale, s * rope_scale

    @triton.jit
    def _mask_scores(s, slot, nmask, b, mask_ptr, sm_b, sm_q, sm_k, total, softcap, GP: tl.constexpr,
                     Q: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr):
        """Scores s [GP, BN] of tokens `slot` [BN] softcapped and masked (-inf where not attended): row g is query
        token g % Q; MASK 0 none, 1 bool, 2 additive [B | 1, 1, Q | 1, >= total]; CAUSAL aligns the Q queries last."""
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        qi = tl.arange(0, GP) % Q
        ok = nmask[None, :] & (qi >= 0)[:, None]
        if CAUSAL:  # query token qi of Q (the last Q stored) sees slots <= total - Q + qi
            ok = ok & (slot[None, :] <= (total - Q + qi)[:, None])
        if MASK != 0:
            mp = mask_ptr + b.to(tl.int64) * sm_b + qi[:, None].to(tl.int64) * sm_q + slot[None, :].to(tl.int64) * sm_k
            if MASK == 1:
                ok = ok & (tl.load(mp, mask=ok, other=0) != 0)
            else:
                s = s + tl.load(mp, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _online(s, m, l):
        """Online softmax over scores s [GP, BN]: (p^T [BN, GP] against the new max, new max m, new sum l, factor
        alpha [GP] that rescales what was accumulated)."""
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        return tl.trans(p), m_new, l * alpha + tl.sum(p, 1), alpha


def cell_pointers(run, view) -> torch.Tensor:
    """CSR pointers [cells + 1] (int32; int64 past 2**31 entries) of a run's outliers per cell: (row, head) for
    "token_all" rows (mode 1: cell = row * H + h), the row itself for "token_head" rows (mode 2).

    Kept on the run and extended by the appended blocks only, from the run's host-known used lengths: a decode
    step adds a few small device ops, no host sync and no rebuild."""
    o = view.outliers
    heads = view.heads if o.mode == 1 else 1
    nnz, rows = o.values.numel(), o.counts.numel()
    dtype = torch.int32 if nnz < 2**31 else torch.int64
    memo = run.__dict__.get("_kvpack_triton_cells")
    edits = run.edits  # changes when blocks are dropped or regrouped (appends keep it)
    if (memo is None or memo["edits"] != edits or memo["src"] != o.counts.data_ptr() or memo["rows"] > rows
            or memo["ptr"].dtype != dtype):
        memo = {"edits": edits, "src": o.counts.data_ptr(), "rows": 0, "entries": 0, "blocks": 0,
                "ptr": torch.zeros(1, dtype=dtype, device=o.counts.device)}
    if memo["rows"] < rows:
        r0, e0 = memo["rows"], memo["entries"]
        e1 = run.used("outlier_values")
        ptr = memo["ptr"]
        if ptr.numel() < rows * heads + 1:
            grown = torch.empty(rows * heads + (rows * heads) // 8 + 64, dtype=dtype, device=ptr.device)
            grown[: r0 * heads + 1] = ptr[: r0 * heads + 1]
            ptr = memo["ptr"] = grown
        new = o.counts[r0:rows].to(torch.int64)
        if heads > 1:
            row = torch.repeat_interleave(torch.arange(rows - r0, device=new.device), new, output_size=e1 - e0)
            cell = row * heads + o.positions[e0:e1].to(torch.int64) // view.dim
            new = torch.zeros((rows - r0) * heads, dtype=torch.int64, device=new.device)
            new.scatter_add_(0, cell, torch.ones_like(cell))
        ptr[r0 * heads + 1: rows * heads + 1] = torch.cumsum(new, 0).to(dtype) + e0
        ptr[r0 * heads] = e0
        memo.update(rows=rows, entries=e1, blocks=run.count)
    run.__dict__["_kvpack_triton_cells"] = memo
    return memo["ptr"]
