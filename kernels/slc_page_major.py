"""The prefill's selected branch page-major: each selected page read once for the queries that chose it.

`nsa_prefill`'s selected-branch kernel (`_slc_kernel`) is query-major: one program per query and
kv group loops over that query's n selected pages. On random selections neighbouring queries
share few pages, so every query reads its own ≈ 13 pages (40 KB each at the paper shape): ≈ 136 GB
of L2 traffic at 64k, and the kernel is L2-bound (docs/benchmarks/prefill.md). This is the
inverted loop of Flash Sparse Attention (FSA, arXiv 2508.18224): per (kv group, sequence,
selected page), the list of (query, selection slot) pairs that chose it (a sort of the top-n ids);
a program loads one page's K/V once and attends a tile of those queries to it (all heads of the
group as the rows of one matrix product), writing each pair's partial output normalised, with its
log-sum-exp; then one program per query and group merges its partials (and the forced blocks'
state, as `_slc_kernel` does) into out = acc + g_slc·o_slc.

What it trades: page reads for query gathers (a query's q is read once per selected page) and the
partials (written once, read once: [pairs, G, Dv] in the scratch's dtype). Which wins is for the
benchmark (`python -m nsa_kernels.bench_prefill --sweep --variants "...;slc_page_major=1"`); it is
off by default (`PrefillConfig.slc_page_major`) until measured on a GPU.

Everything is on the device with fixed shapes (sort, searchsorted, a tile list sized for the most
tiles the pairs can need): no host sync. Its twin is the query-major kernel, and through it
`paged.paged_nsa_attention_ref`; the tests compare both with the float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nsa_prefill import _load_q, _mm, _pow2, _slc_finish, split_head_dim


@triton.jit
def _pm_partial_kernel(
    q_ptr, tile_ptr, perm_ptr, rowpos_ptr, k_ptr, v_ptr, bt_ptr, po_ptr, pl_ptr,
    sq_t, sq_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, row_base, qk_scale, nseq, NB, HS,
    G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr,
    DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    P: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Tile t: pairs first … first + n − 1 of the sorted list, all of one key (kv group h,
    sequence, block). The block's K/V once, then the pairs BQ at a time (BQ·GP rows: query-major,
    heads inside); pair e's partial (o / l, and m + log2 l) into row e·G + g of po / pl."""
    t = tl.program_id(0)
    key = tl.load(tile_ptr + t * 3)
    first = tl.load(tile_ptr + t * 3 + 1)
    n = tl.load(tile_ptr + t * 3 + 2)
    if n > 0:
        blk = key % NB
        h = key // NB // nseq
        seq = key // NB % nseq
        pg = tl.load(bt_ptr + seq.to(tl.int64) * sbt + blk).to(tl.int64)
        kr = tl.arange(0, P)
        dv = tl.arange(0, DVP)
        # The tile's last pair has its latest query (one sequence's rows ascend with their
        # positions, and the sort kept their order): tokens past it are not read, so K/V slots not
        # yet written (say NaN) cannot reach p·V through a zero weight.
        last = tl.load(rowpos_ptr + tl.load(perm_ptr + first + n - 1) // HS)
        k_ok = blk * P + kr <= last
        kb = k_ptr + pg * sk_p + h * sk_h + kr * sk_r
        d1 = tl.arange(0, DK1)
        k1 = tl.load(kb[None, :] + d1[:, None], mask=k_ok[None, :], other=0.0)  # Kᵀ in two column parts, as q
        k2 = k1
        if DK2 > 0:
            d2 = DK1 + tl.arange(0, DK2)
            k2 = tl.load(kb[None, :] + d2[:, None], mask=k_ok[None, :] & (d2[:, None] < DK), other=0.0)
        v = tl.load(v_ptr + pg * sv_p + h * sv_h + kr[:, None] * sv_r + dv[None, :],
                    mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
        i = tl.arange(0, BQ * GP)
        qi = i // GP
        g = i % GP
        head = h * G + g
        for sub in range(0, tl.cdiv(n, BQ)):
            e = sub * BQ + qi
            ok = (e < n) & (g < G)
            pair = tl.load(perm_ptr + first + e, mask=e < n, other=0)
            r = pair // HS
            pos = tl.load(rowpos_ptr + r, mask=ok, other=-1)
            q1, q2 = _load_q(q_ptr, (row_base + r).to(tl.int64) * sq_t + head * sq_h, ok, DK, DK1, DK2)
            s = _mm(q1, k1, PREC, UPCAST)
            if DK2 > 0:
                s += _mm(q2, k2, PREC, UPCAST)
            s = s * qk_scale
            vis = ok[:, None] & ((blk * P + kr)[None, :] <= pos[:, None])  # causal in the current block
            s = tl.where(vis, s, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m > float("-inf"), m, 0.0)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            o = _mm(p.to(v.dtype), v, PREC, UPCAST)
            o = o * tl.where(l > 0, 1.0 / l, 0.0)[:, None]
            prow = pair.to(tl.int64) * G + g
            tl.store(po_ptr + prow[:, None] * DV + dv[None, :], o.to(po_ptr.dtype.element_ty),
                     mask=ok[:, None] & (dv[None, :] < DV))
            tl.store(pl_ptr + prow, tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), -1.0e30), mask=ok)


@triton.jit
def _pm_merge_kernel(
    g_ptr, acc_ptr, out_ptr, idx_ptr, rowpos_ptr, po_ptr, pl_ptr, fm_ptr, fo_ptr,
    sg_t, sg_h, sa_t, sa_h, so_t, so_h, si_t, si_h, sf_t, row_base, Hkv,
    G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    FIRST: tl.constexpr, S: tl.constexpr, FORCED: tl.constexpr,
):
    """Query row r, kv group h: its S partials (slots FIRST … of its selection; −1: none) merged,
    then `_slc_finish` as the query-major kernel ends."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(rowpos_ptr + r)
    if pos >= 0:
        g = tl.arange(0, GP)
        g_ok = g < G
        head = h * G + g
        dv = tl.arange(0, DVP)
        m_i = tl.full([GP], -1.0e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        o = tl.zeros([GP, DVP], tl.float32)
        for s in range(S):
            blk = tl.load(idx_ptr + r.to(tl.int64) * si_t + h * si_h + FIRST + s + g * 0)  # [GP], all alike
            ok = g_ok & (blk >= 0)
            prow = ((r.to(tl.int64) * Hkv + h) * S + s) * G + g
            lse = tl.load(pl_ptr + prow, mask=ok, other=-1.0e30)
            part = tl.load(po_ptr + prow[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV),
                           other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, lse)
            a = tl.where(ok, tl.exp2(lse - m_new), 0.0)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + a
            o = o * alpha[:, None] + part * a[:, None]
            m_i = m_new
        _slc_finish(o, m_i, l_i, r, (row_base + r).to(tl.int64), head, g_ok, dv, g_ptr, acc_ptr, out_ptr,
                    fm_ptr, fo_ptr, sg_t, sg_h, sa_t, sa_h, so_t, so_h, sf_t, DV, FORCED)


def pair_tiles(idx: torch.Tensor, row_seq: torch.Tensor, nseq: int, blocks: int, first: int,
               per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The page-major work list of a slice's selections idx [rows, Hkv, n] (block ids, −1: none;
    slots before `first` are not this branch's) for sequences row_seq [rows] of `nseq`, blocks
    < `blocks`: (perm, tiles). perm [rows·Hkv·(n − first)]: pair indices ((r·Hkv + h)·S + s),
    stably sorted by key (h, sequence, block), the pairs with no block last. tiles int32 [T, 3]:
    (key, first pair in perm, pairs), at most `per_tile` pairs of one key each; T is fixed by the
    shapes (the most tiles the pairs can need), and tiles past the last have 0 pairs."""
    rows, Hkv, n = idx.shape
    S = n - first
    dev = idx.device
    nkeys = Hkv * nseq * blocks
    sel = idx[:, :, first:].long()
    key = (torch.arange(Hkv, device=dev)[None, :, None] * nseq + row_seq.long()[:, None, None]) * blocks + sel
    key = torch.where(sel >= 0, key, nkeys).flatten()
    skey, perm = torch.sort(key, stable=True)
    bounds = torch.searchsorted(skey, torch.arange(nkeys + 1, device=dev))  # key k: bounds[k] … bounds[k+1]
    ntile = (bounds[1:] - bounds[:-1] + per_tile - 1) // per_tile
    tile_end = ntile.cumsum(0)
    M = rows * Hkv * S
    T = max(1, -(-M // per_tile) + min(nkeys, M))  # Σ ⌈c_k / per_tile⌉ ≤ M / per_tile + (keys with pairs)
    t = torch.arange(T, device=dev)
    tk = torch.searchsorted(tile_end, t, right=True)  # the key whose tiles hold t (nkeys: none)
    kc = tk.clamp(max=nkeys - 1)
    start = bounds[kc] + (t - (tile_end[kc] - ntile[kc])) * per_tile
    count = torch.where(tk < nkeys, torch.minimum(bounds[kc + 1] - start, torch.full_like(start, per_tile)), 0)
    return perm, torch.stack([kc, start, count], 1).to(torch.int32).contiguous()


def selected_page_major(q, gates, acc, out, idx, row_seq, row_pos, kc, vc, block_tables, fm, fo, *,
                        nseq: int, blocks: int, forced: bool, num_forced: int, row_base: int,
                        qk_scale: float, prec: str, upcast: bool, config) -> None:
    """The selected branch of one `nsa_prefill` slice (rows row_base … of q, gates and out; acc,
    idx, fm, fo, row_seq, row_pos: the slice's, as `_slc_kernel` takes them), page-major."""
    rows, Hkv, n = idx.shape
    Hq, Dk = q.shape[1], q.shape[2]
    Dv = vc.shape[-1]
    P = kc.shape[2]
    G = Hq // Hkv
    GP = _pow2(G)
    DK1, DK2 = split_head_dim(Dk)
    DVP = max(16, _pow2(Dv))
    first = num_forced if forced else 0
    S = n - first
    BQ = max(1, config.pm_rows // GP, 16 // GP)  # a matrix product needs ≥ 16 rows
    per_tile = max(BQ, config.pm_queries)
    if S > 0:
        perm, tiles = pair_tiles(idx, row_seq, nseq, blocks, first, per_tile)
        po = torch.empty(rows * Hkv * S * G, Dv, dtype=acc.dtype, device=q.device)
        pl = torch.empty(rows * Hkv * S * G, dtype=torch.float32, device=q.device)
        _pm_partial_kernel[(tiles.shape[0],)](
            q, tiles, perm, row_pos, kc, vc, block_tables, po, pl,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2), block_tables.stride(0), row_base, qk_scale,
            nseq, blocks, Hkv * S,
            G=G, GP=GP, BQ=BQ, DK=Dk, DK1=DK1, DK2=DK2, DV=Dv, DVP=DVP, P=P, PREC=prec, UPCAST=upcast,
            num_warps=config.warps_pm,
        )
    else:  # every slot forced: nothing to merge but the forced state (never read below)
        po = pl = acc
    _pm_merge_kernel[(rows, Hkv)](
        gates, acc, out, idx, row_pos, po, pl, fm, fo,
        gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
        idx.stride(0), idx.stride(1), Hq, row_base, Hkv,
        G=G, GP=GP, DV=Dv, DVP=DVP, FIRST=first, S=S, FORCED=forced, num_warps=4,
    )
