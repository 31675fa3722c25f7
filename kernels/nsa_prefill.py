"""Triton NSA prefill over the paged cache: a varlen batch of prompt chunks, three launches a slice.

Its obviously-correct twin is `paged.paged_nsa_attention_ref` (same arguments, same result).
Each chunk's queries are the last tokens of their sequence (positions seq_len − T_b … seq_len − 1);
the chunk's K/V and every summary it completes are already in the pages, so a chunk attends to its
cached context and to itself through one block table.

Launches (per internal slice of at most `max_rows` query rows, which bounds the scratch memory so a
128k prompt fits next to its cache):

1. `_cmp_kernel`, grid (query tile, kv group). A tile is BT consecutive queries of one sequence
   times the G query heads of the group (BT·G rows, so one K/V load serves the whole group).
   Sweep 1 is flash attention over the visible summaries (acc = g_cmp·o_cmp, a scratch in bf16 for
   bf16 inputs, else fp32: `PrefillConfig.acc_bf16`); sweep 2
   recomputes q·k̃ to get the normalised p_cmp and turns it into selection-block scores (overlap
   weights, summed over the group's heads) in a small [rows, Hkv, NB] fp32 buffer. No per-head
   score matrix reaches HBM. The two sweeps run as two launches (`PrefillConfig.cmp_split`): the
   first also stores each row's log-sum-exp ([rows, Hq] fp32), the second reads it, in tiles of
   its own size (`rows_cmp2`: it needs about half the registers, so larger tiles still fit).
2. The window branch, for the first compressed launch's tiles and in that launch after its sweep
   (`PrefillConfig.win_fused`: q read once, acc written once), or in `_win_kernel`, a launch of
   its own: banded flash attention over the pages (or the independent-K/V ring); acc +=
   g_win·o_win. With shared K/V it then also runs the selected
   branch's softmax over each query's forced blocks (the first `num_init` and the `num_local` most
   recent: every query selects them) for the whole tile, and stores that output (normalised, with
   its log-sum-exp; `PrefillConfig.forced_win`): the tile's queries and heads read each forced
   page once.
3. The selection (`_select_rows`): forced initial/local blocks, then the highest scores, ties to
   the lower block index (the reference's stable sort), as block ids [rows, Hkv, n] (−1 where fewer
   are visible). Taken by each `_slc_kernel` program for its own query and group
   (`PrefillConfig.slc_topn`, the default), or by a `_topn_kernel` launch before it.
4. `_slc_kernel`, grid (query, kv group): attention over the n selected pages with all heads of the
   group as the rows of one matrix product (padded to 16 rows), causal inside the current block —
   with `forced_win` only the non-forced ones, merged with the window kernel's forced state;
   writes acc + g_slc·o_slc in the query dtype.

Shapes the launcher accepts: any group size G (padded to a power of two inside), Dk ≠ Dv, head dims
split into power-of-two parts (192 = 128 + 64, so the paper shape wastes no work), page size
P = l' a power of two ≥ 16, d | P, fp32/bf16/fp16 (accumulation in fp32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._triton_utils import target_arch, topn_block, topn_key
from .paged import PagedLayerCache
from .reference import SparsityParams

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the CPU interpreter every call of a nested @triton.jit function re-patches the language
# module (~5 ms a call); the helpers below are plain device code that runs the same as inlined
# Python there. On the GPU they are ordinary jit functions.
_helper = (lambda fn: fn) if _INTERPRET else triton.jit


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_helper
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (CPU interpreter only): its dot multiplies bf16's raw
    bits, so operands go through fp32 there."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@_helper
def _qk(q1, q2, kbase, kmask, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr):
    """q·kᵀ for q split into [.., DK1] and [.., DK2] column parts; kbase: [1, N] row pointers."""
    d1 = tl.arange(0, DK1)
    k1 = tl.load(kbase + d1[:, None], mask=kmask, other=0.0)
    s = _mm(q1, k1, PREC, UPCAST)
    if DK2 > 0:
        d2 = DK1 + tl.arange(0, DK2)
        k2 = tl.load(kbase + d2[:, None], mask=kmask & (d2[:, None] < DK), other=0.0)
        s += _mm(q2, k2, PREC, UPCAST)
    return s


@_helper
def _load_q(q_ptr, q_off, row_ok, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr):
    d1 = tl.arange(0, DK1)
    q1 = tl.load(q_ptr + q_off[:, None] + d1[None, :], mask=row_ok[:, None], other=0.0)
    q2 = q1
    if DK2 > 0:
        d2 = DK1 + tl.arange(0, DK2)
        q2 = tl.load(q_ptr + q_off[:, None] + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < DK), other=0.0)
    return q1, q2


@_helper
def _overlap_tokens(ii, jj, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr):
    """[len(ii), len(jj)] tokens summary i ([i·d, i·d + l)) shares with selection block j."""
    start = tl.maximum(ii[:, None] * D, jj[None, :] * P)
    end = tl.minimum(ii[:, None] * D + L, (jj[None, :] + 1) * P)
    return tl.maximum(end - start, 0).to(tl.float32)


@_helper
def _visible(row_ok, ok_i, ii, pos, D: tl.constexpr, L: tl.constexpr):
    """[rows, entries] causal mask of the compressed branch: entry i is visible to a query at pos
    when its whole block is in the past, i·d + l − 1 ≤ pos (rows and entries that exist)."""
    return row_ok[:, None] & ok_i[None, :] & ((ii[None, :] * D + L - 1) <= pos[:, None])


@_helper
def _full_chunks(pos0, L: tl.constexpr, D: tl.constexpr, CN: tl.constexpr, BN: tl.constexpr,
                 MASK_SPLIT: tl.constexpr):
    """Summaries [0, n) in whole chunks of CN that every query at position ≥ pos0 sees (entry i is
    visible when i·d + l − 1 ≤ pos): the chunks that need no causal mask. 0 without MASK_SPLIT or
    when a chunk is narrower than its tile (CN < BN: padded columns need the mask)."""
    n0 = tl.where(pos0 + 1 >= L, (pos0 + 1 - L) // D + 1, 0)
    if MASK_SPLIT and CN == BN:
        return (n0 // CN) * CN
    else:
        return n0 * 0


@_helper
def _softmax_step(s, m_i, l_i, qk_scale):
    """Online-softmax update for unscaled logits s: (new row max, rescale factor, p, new row sum).
    The row max is scaled once a row and the scale enters the exponent's fused multiply-add, one
    instruction an entry fewer than scaling every logit first."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@_helper
def _sweep1_step(i0, pg_n, q1, q2, m_i, l_i, o, kc_ptr, vc_ptr, bt_row, h, skc_p, skc_h, skc_r, svc_p,
                 svc_h, svc_r, n_vis, row_ok, pos, qk_scale, ar, dv, DK: tl.constexpr, DK1: tl.constexpr,
                 DK2: tl.constexpr, DV: tl.constexpr, P: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                 L: tl.constexpr, CN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 MASKED: tl.constexpr):
    """One chunk of sweep 1 (online softmax over summaries [i0, i0 + CN)); pg_n holds this chunk's
    page ids and is returned holding the next chunk's. MASKED=False: every row sees every entry."""
    ii = i0 + ar
    ok_i = (ar < CN) & (ii < n_vis)
    pg = pg_n.to(tl.int64)
    pg_n = tl.load(bt_row + ((ii + CN) * D) // P, mask=(ar < CN) & (ii + CN < n_vis), other=0)
    kb = kc_ptr + pg * skc_p + h * skc_h + (ii % E) * skc_r
    s = _qk(q1, q2, kb[None, :], ok_i[None, :], DK, DK1, DK2, PREC, UPCAST)
    if MASKED:
        vis = _visible(row_ok, ok_i, ii, pos, D, L)
        s = tl.where(vis, s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    vb = vc_ptr + pg * svc_p + h * svc_h + (ii % E) * svc_r
    vc = tl.load(vb[:, None] + dv[None, :], mask=ok_i[:, None] & (dv[None, :] < DV), other=0.0)
    o = o * alpha[:, None] + _mm(p.to(vc.dtype), vc, PREC, UPCAST)
    return m_new, l_i, o, pg_n


@_helper
def _qk_packed(q1, q2, kd1, kd2, r, DK1: tl.constexpr, DK2: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """q·kᵀ for the packed summary rows [r, r + CN) (tensor descriptors: TMA copies on Hopper)."""
    s = _mm(q1, tl.trans(kd1.load([r, 0])), PREC, UPCAST)
    if DK2 > 0:
        s += _mm(q2, tl.trans(kd2.load([r, DK1])), PREC, UPCAST)
    return s


@_helper
def _sweep1_step_packed(i0, r, q1, q2, m_i, l_i, o, kd1, kd2, vd, n_vis, row_ok, pos, qk_scale, ar,
                        DK1: tl.constexpr, DK2: tl.constexpr, D: tl.constexpr, L: tl.constexpr,
                        CN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """_sweep1_step over the packed summaries: rows [r, r + CN) hold entries [i0, i0 + CN). Rows
    past the sequence's last entry hold finite values (zeros or other rows) and get p = 0."""
    s = _qk_packed(q1, q2, kd1, kd2, r, DK1, DK2, PREC, UPCAST)
    if MASKED:
        ii = i0 + ar
        vis = _visible(row_ok, (ar < CN) & (ii < n_vis), ii, pos, D, L)
        s = tl.where(vis, s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    vc = vd.load([r, 0])
    o = o * alpha[:, None] + _mm(p.to(vc.dtype), vc, PREC, UPCAST)
    return m_new, l_i, o


@_helper
def _split_bf16x3(p):
    """fp32 p as hi + mid + lo in bf16 (24 mantissa bits: fp32's accuracy)."""
    p_hi = p.to(tl.bfloat16)
    r1 = p - p_hi.to(tl.float32)
    p_mid = r1.to(tl.bfloat16)
    return p_hi, p_mid, (r1 - p_mid.to(tl.float32)).to(tl.bfloat16)


@_helper
def _cat_blocks(c, j2, BJ: tl.constexpr, BJE: tl.constexpr):
    """Block ids of chunk c's score columns j2 ∈ [0, 2·BJ): its own blocks, then the next chunk's."""
    return c * BJE + tl.where(j2 < BJ, j2, j2 - BJ + BJE)


@_helper
def _block_sums(p, spill, jr, BT: tl.constexpr, GP: tl.constexpr, BJ: tl.constexpr, E: tl.constexpr,
                D: tl.constexpr, L: tl.constexpr, P: tl.constexpr, KSPAN: tl.constexpr, HSUM: tl.constexpr):
    """A chunk's selection-block scores summed in fp32 registers, without matrix products: the
    chunk is BJ whole pages of E summaries, and summary r of a page shares a fixed number of tokens
    with the page's block + k (k < KSPAN), as in the decode kernel's tiles. For each k: a weighted
    reshape-and-sum over the page's E summaries, the group's heads summed, then moved k blocks on
    (tl.gather): into this chunk's blocks, or past its end into the next chunk's (the spill).
    HSUM (`PrefillConfig.score_hsum`): the heads summed first, then one weighted sum a k on the
    [BT, BJ, E] result (the weights do not depend on the head; the same sums in another order).
    Returns (own [BT, BJ] with the previous chunk's spill added, this chunk's spill)."""
    rr = tl.arange(0, E)
    own = spill
    nxt = tl.zeros([BT, BJ], tl.float32)
    if HSUM:  # the group's heads summed first (the weights do not depend on the head)
        p3 = tl.reshape(tl.sum(tl.reshape(p, (BT, GP, BJ * E)), 1), (BT, BJ, E))
    else:
        p3 = tl.reshape(p, (BT * GP, BJ, E))
    for k in tl.static_range(KSPAN):
        w = (tl.maximum(tl.minimum(rr * D + L, (k + 1) * P) - tl.maximum(rr * D, k * P), 0) / D).to(tl.float32)
        if HSUM:
            part = tl.sum(p3 * w[None, None, :], 2)  # [BT, BJ]
        else:
            part = tl.sum(tl.reshape(tl.sum(p3 * w[None, None, :], 2), (BT, GP, BJ)), 1)  # [BT, BJ]
        if k == 0:
            own += part
        else:
            jj = jr[None, :] + tl.zeros([BT, 1], tl.int32)
            own += tl.where(jj >= k, tl.gather(part, tl.maximum(jj - k, 0), 1), 0.0)
            nxt += tl.where(jj < k, tl.gather(part, tl.minimum(jj + BJ - k, BJ - 1), 1), 0.0)
    return own, nxt


@_helper
def _tile_rows(tile_ptr, BT: tl.constexpr, GP: tl.constexpr, G: tl.constexpr):
    """A query tile: BT consecutive queries of one sequence × the group's heads (padded to GP)."""
    pid = tl.program_id(0)
    seq = tl.load(tile_ptr + pid * 4)
    row0 = tl.load(tile_ptr + pid * 4 + 1)
    nrows = tl.load(tile_ptr + pid * 4 + 2)
    pos0 = tl.load(tile_ptr + pid * 4 + 3)
    r = tl.arange(0, BT * GP)
    t = r // GP
    g = r % GP
    return seq, row0, nrows, pos0, t, g, (t < nrows) & (g < G)


# pack_rows (pages packed × summaries a page) changes with every step's lengths: specialising on
# its divisibility by 16 would make a second variant that the engine's precompile may not meet.
# The window's table (wt_ptr, its row stride swt, ring_pages; read only with WIN, a page id at a
# time) likewise: its alignment depends on the step's layout, and every launch takes it.
@triton.jit(do_not_specialize=["pack_rows", "swt", "ring_pages"], do_not_specialize_on_alignment=["wt_ptr"])
def _cmp_kernel(
    q_ptr, g_ptr, acc_ptr, score_ptr, kc_ptr, vc_ptr, bt_ptr, tile_ptr, kd1, kd2, vd, pack_ptr, pack_rows,
    lse_ptr, sq_t, sq_h, sg_t, sg_h, sa_t, sa_h, ss_t, ss_h, sl_t,
    skc_p, skc_h, skc_r, svc_p, svc_h, svc_r, sbt, row_base, qk_scale,
    k_ptr, v_ptr, wt_ptr, fm_ptr, fo_ptr, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, swt, ring_pages, sf_t,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
    DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    P: tl.constexpr, E: tl.constexpr, D: tl.constexpr, L: tl.constexpr,
    BN: tl.constexpr, CN: tl.constexpr, BJ: tl.constexpr, BJE: tl.constexpr,
    PREC: tl.constexpr, SPREC: tl.constexpr, UPCAST: tl.constexpr, BF16X3: tl.constexpr,
    SCAT: tl.constexpr, MASK_SPLIT: tl.constexpr, PARTS: tl.constexpr, PACKED: tl.constexpr,
    SUMS: tl.constexpr = False, KSPAN: tl.constexpr = 2, HSUM: tl.constexpr = False,
    SWEEPS: tl.constexpr = 3, WIN: tl.constexpr = False, W: tl.constexpr = 1, FORCED: tl.constexpr = False,
    NUM_INIT: tl.constexpr = 1, NUM_LOCAL: tl.constexpr = 2,
):
    """Compressed attention (→ acc = g_cmp·o_cmp) and group-summed selection-block scores.
    PACKED: the summaries are read from `_pack_kernel`'s contiguous copy through tensor
    descriptors kd1 / kd2 (key columns [0, DK1) / [DK1, DK1 + DK2)) and vd; else through the
    block table, page by page. SWEEPS 3 runs both sweeps; 1 only the first, storing each row's
    statistics (m + log2 l, base 2) at lse_ptr [rows, Hq] fp32; 2 only the second, reading them.
    WIN (with SWEEPS 1): then also `_win_kernel`'s work for the same tile (the window branch
    added to acc, with FORCED the forced blocks' state), with q already loaded and acc written once."""
    BM: tl.constexpr = BT * GP
    h = tl.program_id(1)
    seq, row0, nrows, pos0, t, g, row_ok = _tile_rows(tile_ptr, BT, GP, G)
    pos_last = pos0 + nrows - 1
    pos = pos0 + t
    qrow = (row0 + t).to(tl.int64)
    head = h * G + g
    q1, q2 = _load_q(q_ptr, qrow * sq_t + head * sq_h, row_ok, DK, DK1, DK2)
    dv = tl.arange(0, DVP)
    bt_row = bt_ptr + seq.to(tl.int64) * sbt
    ar = tl.arange(0, BN)

    # Sweep 1: flash attention over the visible summaries (entry i visible when i·d + l − 1 ≤ pos).
    n_vis = tl.where(pos_last + 1 >= L, (pos_last + 1 - L) // D + 1, 0)
    n_full = _full_chunks(pos0, L, D, CN, BN, MASK_SPLIT)
    arow = (row0 + t - row_base).to(tl.int64)
    if PACKED:
        # This sequence's entries for kv head h start at packed row r0p (entry i at r0p + i).
        r0p = h * pack_rows + tl.load(pack_ptr + seq) * E
    if SWEEPS != 2:
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        o = tl.zeros([BM, DVP], tl.float32)
        # Page ids are read a chunk ahead (carried): summary addresses loaded in the same iteration
        # leave Triton's pipeliner nothing to issue early, so the next chunk's copies would start only
        # after this chunk's math (the decode kernels' finding, docs/benchmarks/decode.md 7th round).
        # Chunks every row of the tile sees whole (below the first query's visible count) skip the
        # causal mask: one loop without it, one with it for the rest.
        if PACKED:
            for i0 in range(0, n_full, CN):
                m_i, l_i, o = _sweep1_step_packed(i0, r0p + i0, q1, q2, m_i, l_i, o, kd1, kd2, vd, n_vis, row_ok,
                                                  pos, qk_scale, ar, DK1, DK2, D, L, CN, PREC, UPCAST, False)
            for i0 in range(n_full, n_vis, CN):
                m_i, l_i, o = _sweep1_step_packed(i0, r0p + i0, q1, q2, m_i, l_i, o, kd1, kd2, vd, n_vis, row_ok,
                                                  pos, qk_scale, ar, DK1, DK2, D, L, CN, PREC, UPCAST, True)
        else:
            pg_n = tl.load(bt_row + (ar * D) // P, mask=(ar < CN) & (ar < n_vis), other=0)
            for i0 in range(0, n_full, CN):
                m_i, l_i, o, pg_n = _sweep1_step(i0, pg_n, q1, q2, m_i, l_i, o, kc_ptr, vc_ptr, bt_row, h, skc_p,
                                                 skc_h, skc_r, svc_p, svc_h, svc_r, n_vis, row_ok, pos, qk_scale,
                                                 ar, dv, DK, DK1, DK2, DV, P, E, D, L, CN, PREC, UPCAST, False)
            for i0 in range(n_full, n_vis, CN):
                m_i, l_i, o, pg_n = _sweep1_step(i0, pg_n, q1, q2, m_i, l_i, o, kc_ptr, vc_ptr, bt_row, h, skc_p,
                                                 skc_h, skc_r, svc_p, svc_h, svc_r, n_vis, row_ok, pos, qk_scale,
                                                 ar, dv, DK, DK1, DK2, DV, P, E, D, L, CN, PREC, UPCAST, True)
        # 0 for padded rows (heads g ≥ G, queries past the tile): sweep 2 sums p over the padded group,
        # and its unmasked chunks would otherwise add the padded heads' p.
        inv_l = tl.where(row_ok & (l_i > 0), 1.0 / l_i, 0.0)
        g_cmp = tl.load(g_ptr + qrow * sg_t + head * sg_h, mask=row_ok, other=0.0).to(tl.float32)
        # Rounded to acc's dtype as the store would: the window branch is added to this value as
        # `_win_kernel` adds it to the stored one (the same result, bitwise).
        res = (o * (inv_l * g_cmp)[:, None]).to(acc_ptr.dtype.element_ty)
        if SWEEPS == 1:
            # Rows that see no summary (and padded ones) get 1e30: their p is 0 in sweep 2.
            lse = tl.where(inv_l > 0, m_i - tl.log2(tl.where(inv_l > 0, inv_l, 1.0)), 1.0e30)
            tl.store(lse_ptr + arow * sl_t + head, lse, mask=row_ok)
        amask = row_ok[:, None] & (dv[None, :] < DV)
        if WIN:
            win = _win_branch(q1, q2, g_ptr, k_ptr, v_ptr, wt_ptr, seq, pos0, pos_last, pos, qrow, head, h,
                              row_ok, sg_t, sg_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, swt, ring_pages, qk_scale,
                              BM, DK, DK1, DK2, DV, DVP, P, W, PREC, UPCAST)
            res = (res.to(tl.float32) + win).to(acc_ptr.dtype.element_ty)
        tl.store(acc_ptr + arow[:, None] * sa_t + head[:, None] * sa_h + dv[None, :], res, mask=amask)
        if WIN and FORCED:
            _forced_tile(q1, q2, k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr, seq, pos0, pos_last, pos, arow, head, h,
                         row_ok, sa_t, sa_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, qk_scale,
                         BM, DK, DK1, DK2, DV, DVP, P, NUM_INIT, NUM_LOCAL, PREC, UPCAST)
    if SWEEPS == 2:
        m_i = tl.load(lse_ptr + arow * sl_t + head, mask=row_ok, other=1.0e30)
        inv_l = tl.where(row_ok, 1.0, 0.0)  # p = exp2(s − m − log2 l) is normalised already

    if SWEEPS != 1:
        # Sweep 2: normalised p_cmp → selection-block scores. Chunk c covers summaries
        # [c·CN, (c+1)·CN) and owns blocks [c·BJE, (c+1)·BJE) (CN·d = BJE·P). A summary can spill
        # into the next chunk's blocks (l > d), never further, so each chunk adds its own part plus
        # the previous chunk's spill and hands on its own. Per-row block scores come from a matrix
        # product with p as the A operand (as in p·V); the group's heads are then summed on the small
        # [rows, blocks] result.
        tq = tl.arange(0, BT)
        jr = tl.arange(0, BJ)
        cur_last = pos_last // P
        n_chunks = tl.maximum(tl.cdiv(n_vis, CN), cur_last // BJE + 1)
        spill = tl.zeros([BT, BJ], tl.float32)
        cur_t = (pos0 + tq) // P
        srow = (row0 + tq - row_base).to(tl.int64)
        if not PACKED:
            pg_n = tl.load(bt_row + (ar * D) // P, mask=(ar < CN) & (ar < n_vis), other=0)
        # Chunk c's weights are chunk 0's: summaries and blocks both move by CN·d = BJE·P tokens.
        j2 = tl.arange(0, 2 * BJ)
        w2b = _overlap_tokens(ar, _cat_blocks(0, j2, BJ, BJE), D, L, P).to(tl.bfloat16)
        # With the bf16 products, 1/l is applied to their [rows, blocks] result (half the entries)
        # instead of to p; it is 0 for padded rows either way.
        NORM_AFTER: tl.constexpr = BF16X3 and SCAT and not SUMS
        for c in range(0, n_chunks):
            i0 = c * CN
            ii = i0 + ar
            ok_i = (ar < CN) & (ii < n_vis)
            if PACKED:
                s = _qk_packed(q1, q2, kd1, kd2, r0p + i0, DK1, DK2, PREC, UPCAST) * qk_scale
            else:
                pg = pg_n.to(tl.int64)  # read a chunk ahead, as in sweep 1
                pg_n = tl.load(bt_row + ((ii + CN) * D) // P, mask=(ar < CN) & (ii + CN < n_vis), other=0)
                kb = kc_ptr + pg * skc_p + h * skc_h + (ii % E) * skc_r
                s = _qk(q1, q2, kb[None, :], ok_i[None, :], DK, DK1, DK2, PREC, UPCAST) * qk_scale
            if MASK_SPLIT:  # a run-time branch: chunks below n_full are seen whole by every row
                if i0 < n_full:
                    p = tl.exp2(s - m_i[:, None])
                else:
                    vis = _visible(row_ok, ok_i, ii, pos, D, L)
                    p = tl.where(vis, tl.exp2(s - m_i[:, None]), 0.0)
            else:
                vis = _visible(row_ok, ok_i, ii, pos, D, L)
                p = tl.where(vis, tl.exp2(s - m_i[:, None]), 0.0)
            if not NORM_AFTER:
                p = p * inv_l[:, None]
            j_own = c * BJE + jr
            if SUMS:
                own, spill = _block_sums(p, spill, jr, BT, GP, BJ, E, D, L, P, KSPAN, HSUM)
            elif BF16X3 and SCAT:
                # As below, with this chunk's blocks and the next chunk's (the spill) as the two halves
                # of one [CN, 2·BJ] weight matrix: one product of width 2·BJ per bf16 part of p (two by
                # default: 16 mantissa bits) instead of two of BJ.
                p_hi, p_mid, p_lo = _split_bf16x3(p)
                sc = _mm(p_hi, w2b, "tf32", UPCAST) + _mm(p_mid, w2b, "tf32", UPCAST)
                if PARTS == 3:
                    sc += _mm(p_lo, w2b, "tf32", UPCAST)
                sc = sc * inv_l[:, None]
                both = tl.sum(tl.reshape(sc, (BT, GP, 2 * BJ)), 1) / D  # [BT, 2·BJ]: own | next
                own_c, nxt_c = tl.split(tl.permute(tl.reshape(both, (BT, 2, BJ)), (0, 2, 1)))
                own = own_c + spill
                spill = nxt_c
            elif BF16X3:
                # p = hi + mid + lo in bf16 (24 mantissa bits, fp32's accuracy) against the overlap
                # token counts (small integers, exact in bf16): three cheap bf16 products instead of
                # fp32 ones, with p as the A operand straight from registers, as in p·V.
                w_o = _overlap_tokens(ii, j_own, D, L, P).to(tl.bfloat16)
                w_n = _overlap_tokens(ii, j_own + BJE, D, L, P).to(tl.bfloat16)
                p_hi, p_mid, p_lo = _split_bf16x3(p)
                sc_own = _mm(p_hi, w_o, "tf32", UPCAST) + _mm(p_mid, w_o, "tf32", UPCAST)
                sc_own += _mm(p_lo, w_o, "tf32", UPCAST)
                sc_nxt = _mm(p_hi, w_n, "tf32", UPCAST) + _mm(p_mid, w_n, "tf32", UPCAST)
                sc_nxt += _mm(p_lo, w_n, "tf32", UPCAST)
                own = tl.sum(tl.reshape(sc_own, (BT, GP, BJ)), 1) / D + spill
                spill = tl.sum(tl.reshape(sc_nxt, (BT, GP, BJ)), 1) / D
            else:  # fp32 products ("tf32x3"): overlap counts above 256 are not exact in bf16
                sc_own = tl.dot(p, _overlap_tokens(ii, j_own, D, L, P), input_precision=SPREC)
                sc_nxt = tl.dot(p, _overlap_tokens(ii, j_own + BJE, D, L, P), input_precision=SPREC)
                own = tl.sum(tl.reshape(sc_own, (BT, GP, BJ)), 1) / D + spill
                spill = tl.sum(tl.reshape(sc_nxt, (BT, GP, BJ)), 1) / D
            smask = (tq[:, None] < nrows) & (jr[None, :] < BJE) & (j_own[None, :] <= cur_t[:, None])
            tl.store(score_ptr + srow[:, None] * ss_t + h * ss_h + j_own[None, :], own, mask=smask)


@triton.jit(do_not_specialize=["pack_rows"])
def _pack_kernel(kc_ptr, vc_ptr, bt_ptr, pages_ptr, lens_ptr, kp_ptr, vp_ptr,
                 skc_p, skc_h, skc_r, svc_p, svc_h, svc_r, sbt, pack_rows,
                 DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr,
                 DVP: tl.constexpr, E: tl.constexpr, D: tl.constexpr, L: tl.constexpr):
    """Copy page j of the pack list ((sequence, page slot) pairs) for kv head h: its E summaries
    into rows h·pack_rows + j·E + e of the packed K̃ [.., DK1 + DK2] and Ṽ [.., DVP] — zeros for
    summaries not yet complete (never written: the page may hold anything) and past DK / DV."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(pages_ptr + 2 * j)
    slot = tl.load(pages_ptr + 2 * j + 1)
    seq_len = tl.load(lens_ptr + seq)
    pg = tl.load(bt_ptr + seq.to(tl.int64) * sbt + slot).to(tl.int64)
    e = tl.arange(0, E)
    done = (slot * E + e) * D + L <= seq_len  # summary i = slot·E + e covers tokens [i·d, i·d + l)
    row = (h * pack_rows + j * E + e).to(tl.int64)
    kb = kc_ptr + pg * skc_p + h * skc_h + e[:, None] * skc_r
    d1 = tl.arange(0, DK1)
    tl.store(kp_ptr + row[:, None] * (DK1 + DK2) + d1[None, :],
             tl.load(kb + d1[None, :], mask=done[:, None], other=0.0))
    if DK2 > 0:
        d2 = DK1 + tl.arange(0, DK2)
        tl.store(kp_ptr + row[:, None] * (DK1 + DK2) + d2[None, :],
                 tl.load(kb + d2[None, :], mask=done[:, None] & (d2[None, :] < DK), other=0.0))
    dv = tl.arange(0, DVP)
    v = tl.load(vc_ptr + pg * svc_p + h * svc_h + e[:, None] * svc_r + dv[None, :],
                mask=done[:, None] & (dv[None, :] < DV), other=0.0)
    tl.store(vp_ptr + row[:, None] * DVP + dv[None, :], v)


@triton.jit
def _win_kernel(
    q_ptr, g_ptr, acc_ptr, k_ptr, v_ptr, wt_ptr, tile_ptr, bt_ptr, fm_ptr, fo_ptr,
    sq_t, sq_h, sg_t, sg_h, sa_t, sa_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r,
    swt, ring_pages, sbt, sf_t, row_base, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
    DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    P: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    FORCED: tl.constexpr = False, NUM_INIT: tl.constexpr = 1, NUM_LOCAL: tl.constexpr = 2,
):
    """Window branch as banded flash attention over (pos − w, pos]; acc += g_win·o_win.

    FORCED (shared K/V only): then the selected branch's softmax over each query's forced blocks
    (the first NUM_INIT and the NUM_LOCAL most recent, which every query selects), for the whole
    tile at once: its BT queries × G heads read each forced page once instead of once a query
    and kv group in `_slc_kernel`, and the local pages were just read by the window loop (L2
    hits). Its output, normalised, goes to fo (acc's layout) and its log-sum-exp (log2 units) to
    fm ([rows, Hq], row stride sf_t); `_slc_kernel` skips those blocks (they lead each query's
    selection) and merges this state after its loop."""
    BM: tl.constexpr = BT * GP
    h = tl.program_id(1)
    seq, row0, nrows, pos0, t, g, row_ok = _tile_rows(tile_ptr, BT, GP, G)
    pos_last = pos0 + nrows - 1
    pos = pos0 + t
    qrow = (row0 + t).to(tl.int64)
    head = h * G + g
    q1, q2 = _load_q(q_ptr, qrow * sq_t + head * sq_h, row_ok, DK, DK1, DK2)
    dv = tl.arange(0, DVP)
    win = _win_branch(q1, q2, g_ptr, k_ptr, v_ptr, wt_ptr, seq, pos0, pos_last, pos, qrow, head, h, row_ok,
                      sg_t, sg_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, swt, ring_pages, qk_scale,
                      BM, DK, DK1, DK2, DV, DVP, P, W, PREC, UPCAST)
    arow = (row0 + t - row_base).to(tl.int64)
    amask = row_ok[:, None] & (dv[None, :] < DV)
    aptr = acc_ptr + arow[:, None] * sa_t + head[:, None] * sa_h + dv[None, :]
    acc = tl.load(aptr, mask=amask, other=0.0).to(tl.float32)
    tl.store(aptr, (acc + win).to(acc_ptr.dtype.element_ty), mask=amask)
    if FORCED:
        _forced_tile(q1, q2, k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr, seq, pos0, pos_last, pos, arow, head, h,
                     row_ok, sa_t, sa_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, qk_scale,
                     BM, DK, DK1, DK2, DV, DVP, P, NUM_INIT, NUM_LOCAL, PREC, UPCAST)


@_helper
def _win_branch(q1, q2, g_ptr, k_ptr, v_ptr, wt_ptr, seq, pos0, pos_last, pos, qrow, head, h, row_ok,
                sg_t, sg_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, swt, ring_pages, qk_scale,
                BM: tl.constexpr, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr,
                DVP: tl.constexpr, P: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """g_win·o_win [BM, DVP] fp32 of a query tile: banded flash attention over (pos − w, pos],
    page by page through wt (the block table, or an independent-K/V window ring)."""
    dv = tl.arange(0, DVP)
    wt_row = wt_ptr + seq.to(tl.int64) * swt
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    o = tl.zeros([BM, DVP], tl.float32)
    kr = tl.arange(0, P)
    w_lo = tl.maximum(pos0 - W + 1, 0)
    pj0 = w_lo // P
    pg_n = tl.load(wt_row + pj0 % ring_pages)
    for pj in range(pj0, pos_last // P + 1):
        pg = pg_n.to(tl.int64)  # read a page ahead (see _cmp_kernel); none past the last page
        pg_n = tl.load(wt_row + (pj + 1) % ring_pages, mask=pj < pos_last // P, other=0)
        kk = pj * P + kr
        kb = k_ptr + pg * sk_p + h * sk_h + kr * sk_r
        s = _qk(q1, q2, kb[None, :], kk[None, :] <= pos_last, DK, DK1, DK2, PREC, UPCAST)
        ok = row_ok[:, None] & (kk[None, :] <= pos[:, None]) & (kk[None, :] > pos[:, None] - W)
        s = tl.where(ok, s, float("-inf"))
        m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i, qk_scale)
        vb = v_ptr + pg * sv_p + h * sv_h + kr * sv_r
        v = tl.load(vb[:, None] + dv[None, :], mask=(kk[:, None] <= pos_last) & (dv[None, :] < DV),
                    other=0.0)
        o = o * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    g_win = tl.load(g_ptr + qrow * sg_t + head * sg_h + 2, mask=row_ok, other=0.0).to(tl.float32)
    return o * (tl.where(l_i > 0, 1.0 / l_i, 0.0) * g_win)[:, None]


@_helper
def _forced_tile(q1, q2, k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr, seq, pos0, pos_last, pos, arow, head, h,
                 row_ok, sa_t, sa_h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, qk_scale,
                 BM: tl.constexpr, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr,
                 DVP: tl.constexpr, P: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The selected branch's softmax over a query tile's forced blocks (`_win_kernel` FORCED):
    normalised output to fo (acc's layout), log-sum-exp (log2 units) to fm."""
    # A tile's queries are consecutive, so their forced blocks are the first NUM_INIT and the
    # local run from the first query's oldest to the last query's current block; each row
    # masks what is not forced for it (and keys past it: causal inside the current block).
    dv = tl.arange(0, DVP)
    bt_row = bt_ptr + seq.to(tl.int64) * sbt
    cur = pos // P
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    o = tl.zeros([BM, DVP], tl.float32)
    n_init = tl.minimum(NUM_INIT, pos_last // P + 1)
    lo = tl.maximum(NUM_INIT, pos0 // P - NUM_LOCAL + 1)  # first local block not an initial one
    for i in range(0, n_init + tl.maximum(pos_last // P + 1 - lo, 0)):
        j = tl.where(i < n_init, i, lo + i - n_init)
        m_i, l_i, o = _forced_page(j, bt_row, q1, q2, m_i, l_i, o, k_ptr, v_ptr, h, sk_p, sk_h, sk_r,
                                   sv_p, sv_h, sv_r, pos, pos_last, cur, row_ok, qk_scale, P, DK, DK1, DK2, DV,
                                   DVP, NUM_INIT, NUM_LOCAL, PREC, UPCAST)
    # Normalised, with its log-sum-exp (log2 units): one value a row fewer to merge.
    frow = arow * sf_t + head
    tl.store(fm_ptr + frow, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)) + tl.where(l_i > 0, 0.0, -1.0e30),
             mask=row_ok)
    o = o * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None]
    tl.store(fo_ptr + arow[:, None] * sa_t + head[:, None] * sa_h + dv[None, :],
             o.to(fo_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


@_helper
def _forced_page(j, bt_row, q1, q2, m_i, l_i, o, k_ptr, v_ptr, h, sk_p, sk_h, sk_r, sv_p, sv_h, sv_r,
                 pos, pos_last, cur, row_ok, qk_scale, P: tl.constexpr, DK: tl.constexpr, DK1: tl.constexpr,
                 DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, NUM_INIT: tl.constexpr,
                 NUM_LOCAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step of the selected branch over block j for the rows it is forced for
    (`_win_kernel` FORCED)."""
    kr = tl.arange(0, P)
    dv = tl.arange(0, DVP)
    pg = tl.load(bt_row + j).to(tl.int64)
    kk = j * P + kr
    kb = k_ptr + pg * sk_p + h * sk_h + kr * sk_r
    kin = kk <= pos_last  # keys past the tile's last query may be unwritten (NaN): not loaded
    s = _qk(q1, q2, kb[None, :], kin[None, :], DK, DK1, DK2, PREC, UPCAST)
    forced = row_ok & (j <= cur) & ((j < NUM_INIT) | (j > cur - NUM_LOCAL))
    s = tl.where(forced[:, None] & (kk[None, :] <= pos[:, None]), s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    v = tl.load(v_ptr + pg * sv_p + h * sv_h + kr[:, None] * sv_r + dv[None, :],
                mask=kin[:, None] & (dv[None, :] < DV), other=0.0)
    return m_new, l_i, o * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)


@_helper
def _select_rows(score_ptr, r, r_ok, pos, h, ss_t, ss_h, NSEL: tl.constexpr, NUM_INIT: tl.constexpr,
                 NUM_LOCAL: tl.constexpr, P: tl.constexpr, NBP: tl.constexpr, NSP: tl.constexpr,
                 GS: tl.constexpr):
    """Block ids [R, NSP] of rows r [R] (queries at pos, kv group h) from their block scores: the
    forced blocks (the first NUM_INIT and the NUM_LOCAL most recent that exist, in index order:
    what passes over their +inf keys would pick first), then n − NUM_INIT − NUM_LOCAL arg-max
    passes over the other visible blocks, ties to the lower block index: each pass is one int64
    max over `topn_key`s (score bits, then the index). A max and an arg-max reduction a pass took
    2.54 ms at 64k on the H200 against 2.26 (docs/benchmarks/prefill.md, sixteenth session);
    placing the forced blocks without passes saves three of the paper's sixteen (twenty-first).
    A row with at most NUM_INIT + NUM_LOCAL visible blocks has them all forced, and −1 after.

    GS > 0 (`PrefillConfig.topn_groups`): the passes first pick the best groups of GS consecutive
    blocks by their best key, then the blocks among those groups' keys (reloaded). Exact: a block
    among the m best lies in one of the m best groups, since each better group holds a better
    key. The passes then run over NBP / GS and NSP · GS keys instead of NBP."""
    cur = pos // P
    k = tl.arange(0, NSP)
    # Forced blocks first: k < n_init → block k; then the local run from lo to cur.
    n_init = tl.minimum(NUM_INIT, cur + 1)
    lo = tl.maximum(NUM_INIT, cur - NUM_LOCAL + 1)
    n_forced = n_init + tl.maximum(cur - lo + 1, 0)  # [R]
    fblk = tl.where(k[None, :] < n_init[:, None], k[None, :], lo[:, None] + k[None, :] - n_init[:, None])
    out = tl.where((k[None, :] < n_forced[:, None]) & r_ok[:, None], fblk, -1)
    base = score_ptr + r.to(tl.int64)[:, None] * ss_t + h * ss_h
    j = tl.arange(0, NBP)
    jj = j[None, :]
    key = _row_keys(base, jj, cur, r_ok, NUM_INIT, NUM_LOCAL)
    if GS > 0:
        NG: tl.constexpr = NBP // GS
        gkey = tl.max(tl.reshape(key, [key.shape[0], NG, GS]), 2)  # [R, NG]: each group's best
        gi = tl.arange(0, NG)
        grp = tl.full([key.shape[0], NSP], -1, tl.int32)
        for s in range(NSEL - NUM_INIT - NUM_LOCAL):
            best = tl.max(gkey, 1)
            g = tl.where(best >= 0, topn_block(best) // GS, -1)
            grp = tl.where(k[None, :] == s, g[:, None], grp)
            gkey = tl.where(gi[None, :] == g[:, None], -1, gkey)
        e = tl.arange(0, GS)
        jc = tl.reshape(tl.maximum(grp, 0)[:, :, None] * GS + e[None, None, :], [key.shape[0], NSP * GS])
        okc = tl.reshape((grp >= 0)[:, :, None] & (e[None, None, :] >= 0), [key.shape[0], NSP * GS])
        key = tl.where(okc, _row_keys(base, jc, cur, r_ok, NUM_INIT, NUM_LOCAL), -1)
        jj = jc  # (a slot of a group not picked repeats blocks 0 … GS − 1 with key −1)
    for s in range(NSEL - NUM_INIT - NUM_LOCAL):
        pick = topn_block(tl.max(key, 1))  # −1: nothing visible left
        out = tl.where(k[None, :] == n_forced[:, None] + s, pick[:, None], out)
        key = tl.where(jj == pick[:, None], -1, key)
    return out


@_helper
def _row_keys(base, j, cur, r_ok, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr):
    """`topn_key`s of blocks j [R, C] of rows whose scores start at base [R, 1]; −1 for forced blocks
    (placed without passes) and blocks not visible."""
    vis = (j <= cur[:, None]) & r_ok[:, None]
    sc = tl.load(base + j, mask=vis, other=0.0)
    forced = vis & ((j < NUM_INIT) | (j > cur[:, None] - NUM_LOCAL))
    # +0.0 for anything not above 0 (−0.0's bits would sort below every other score).
    return tl.where(forced, -1, topn_key(tl.where(sc > 0, sc, 0.0), j, forced, vis))


@triton.jit
def _topn_kernel(score_ptr, idx_ptr, rowpos_ptr, nrows, ss_t, ss_h, si_t, si_h,
                 NSEL: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
                 P: tl.constexpr, NBP: tl.constexpr, NSP: tl.constexpr, RB: tl.constexpr,
                 GS: tl.constexpr = 0):
    """`_select_rows` of RB query rows a program → block ids [rows, Hkv, n]."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    h = tl.program_id(1)
    r_ok = r < nrows
    pos = tl.load(rowpos_ptr + r, mask=r_ok, other=-1)
    out = _select_rows(score_ptr, r, r_ok, pos, h, ss_t, ss_h, NSEL, NUM_INIT, NUM_LOCAL, P, NBP, NSP, GS)
    k = tl.arange(0, NSP)
    tl.store(idx_ptr + r.to(tl.int64)[:, None] * si_t + h * si_h + k[None, :], out,
             mask=r_ok[:, None] & (k[None, :] < NSEL))


@triton.jit
def _slc_kernel(
    q_ptr, g_ptr, acc_ptr, out_ptr, idx_ptr, rowseq_ptr, rowpos_ptr,
    k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr,
    sq_t, sq_h, sg_t, sg_h, sa_t, sa_h, so_t, so_h, si_t, si_h,
    sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, row_base, qk_scale,
    G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    P: tl.constexpr, NSEL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    FORCED: tl.constexpr = False, NUM_INIT: tl.constexpr = 1, NUM_LOCAL: tl.constexpr = 2,
    score_ptr=None, ss_t=0, ss_h=0, TOPN: tl.constexpr = False, NBP: tl.constexpr = 16,
    NSP: tl.constexpr = 16,
):
    """Selected branch of query row r and kv group h over its NSEL selected blocks; out = acc +
    g_slc·o_slc. FORCED: the forced blocks, which lead the selection (+inf keys, `_select_rows`),
    were attended by `_win_kernel`: skip them, and merge its output after the loop.

    TOPN (`PrefillConfig.slc_topn`): the program selects its own blocks from the block scores
    (`_select_rows` over every block, as `_topn_kernel` would), stores them to idx, and keeps them
    in registers — no top-n launch, and no id load inside the loop. This kernel waits on its loads
    most of the time (docs/benchmarks/prefill.md, sixteenth session), so part of the selection's
    arithmetic fills issue slots its neighbours leave idle: H200, 64k, slc +1.2 ms against the
    top-n kernel's 2.0 (128k: +4.5 against 6.8). With the block-group passes it took 19.5 ms
    instead of 18.8 at 64k: at 2 warps each pass's reduction crosses warps, and groups double the
    passes (twenty-third session)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(rowpos_ptr + r)
    if pos >= 0:  # a static plan's rows outside its chunks (position −1) are left as they are
        _slc_row(q_ptr, g_ptr, acc_ptr, out_ptr, idx_ptr, rowseq_ptr, k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr,
                 sq_t, sq_h, sg_t, sg_h, sa_t, sa_h, so_t, so_h, si_t, si_h,
                 sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, row_base, qk_scale, r, h, pos,
                 G, GP, DK, DK1, DK2, DV, DVP, P, NSEL, PREC, UPCAST, FORCED, NUM_INIT, NUM_LOCAL,
                 score_ptr, ss_t, ss_h, TOPN, NBP, NSP)


@_helper
def _slc_row(q_ptr, g_ptr, acc_ptr, out_ptr, idx_ptr, rowseq_ptr, k_ptr, v_ptr, bt_ptr, fm_ptr, fo_ptr,
             sq_t, sq_h, sg_t, sg_h, sa_t, sa_h, so_t, so_h, si_t, si_h,
             sk_p, sk_h, sk_r, sv_p, sv_h, sv_r, sbt, sf_t, row_base, qk_scale, r, h, pos,
             G: tl.constexpr, GP: tl.constexpr,
             DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
             P: tl.constexpr, NSEL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             FORCED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
             score_ptr, ss_t, ss_h, TOPN: tl.constexpr, NBP: tl.constexpr, NSP: tl.constexpr):
    """`_slc_kernel`'s work for query row r (at pos) and kv group h."""
    row = (row_base + r).to(tl.int64)
    seq = tl.load(rowseq_ptr + r)
    if TOPN:
        one = tl.arange(0, 1)
        sel = tl.reshape(_select_rows(score_ptr, r + one, one == 0, pos + one, h, ss_t, ss_h, NSEL, NUM_INIT,
                                      NUM_LOCAL, P, NBP, NSP, 0), [NSP])
        ks = tl.arange(0, NSP)
        tl.store(idx_ptr + r.to(tl.int64) * si_t + h * si_h + ks, sel, mask=ks < NSEL)
    g = tl.arange(0, GP)
    g_ok = g < G
    head = h * G + g
    q1, q2 = _load_q(q_ptr, row * sq_t + head * sq_h, g_ok, DK, DK1, DK2)
    dv = tl.arange(0, DVP)
    kr = tl.arange(0, P)
    bt_row = bt_ptr + seq.to(tl.int64) * sbt
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    o = tl.zeros([GP, DVP], tl.float32)
    if FORCED:
        # A query at pos with more than NUM_INIT + NUM_LOCAL visible blocks has that many forced
        # ones; with fewer, every visible block is forced and the entries after them are −1.
        FIRST: tl.constexpr = NUM_INIT + NUM_LOCAL
    else:
        FIRST: tl.constexpr = 0
    for sidx in range(FIRST, NSEL):
        if TOPN:
            blk = tl.sum(tl.where(ks == sidx, sel, 0))
        else:
            blk = tl.load(idx_ptr + r.to(tl.int64) * si_t + h * si_h + sidx)
        pg = tl.load(bt_row + tl.maximum(blk, 0)).to(tl.int64)
        kk = blk * P + kr
        kmask = (kk >= 0) & (kk <= pos)  # no block (id −1) → all masked; causal inside the current block
        kb = k_ptr + pg * sk_p + h * sk_h + kr * sk_r
        s = _qk(q1, q2, kb[None, :], kmask[None, :], DK, DK1, DK2, PREC, UPCAST) * qk_scale
        s = tl.where(g_ok[:, None] & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = v_ptr + pg * sv_p + h * sv_h + kr * sv_r
        v = tl.load(vb[:, None] + dv[None, :], mask=kmask[:, None] & (dv[None, :] < DV), other=0.0)
        o = o * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    omask = g_ok[:, None] & (dv[None, :] < DV)
    aoff = r.to(tl.int64) * sa_t + head * sa_h  # acc and the forced state share a layout
    if FORCED:  # merged after the loop, so that its state is not held through it
        lse = tl.load(fm_ptr + r.to(tl.int64) * sf_t + head, mask=g_ok, other=-1.0e30)
        m_new = tl.maximum(m_i, lse)
        a_f = tl.exp2(lse - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + a_f
        o = o * alpha[:, None] + tl.load(fo_ptr + aoff[:, None] + dv[None, :], mask=omask,
                                         other=0.0).to(tl.float32) * a_f[:, None]
    o = o * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None]
    g_slc = tl.load(g_ptr + row * sg_t + head * sg_h + 1, mask=g_ok, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + aoff[:, None] + dv[None, :], mask=omask, other=0.0).to(tl.float32)
    res = acc + g_slc[:, None] * o
    tl.store(out_ptr + row * so_t + head[:, None] * so_h + dv[None, :],
             res.to(out_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_head_dim(dk: int) -> tuple[int, int]:
    """Head dim as two power-of-two tiles (DK1, DK2): 192 → (128, 64), 128 → (128, 0), 24 → (16, 16).
    The second part is masked when it overhangs; both are ≥ 16 (the matrix-unit minimum)."""
    if dk < 16:
        return 16, 0
    d1 = 1 << (dk.bit_length() - 1)
    rest = dk - d1
    return d1, (max(16, _pow2(rest)) if rest else 0)


@dataclass
class PrefillConfig:
    """Tile shapes (defaults: the fastest of a sweep at 64k on an H100, re-swept on an H200,
    docs/benchmarks/prefill.md). rows_*: query-tile rows (queries × padded group) of the compressed
    and window kernels; cmp_chunk: summaries per step; stages_*: software-pipeline stages (the page
    ids are read a step ahead, so with 3 stages — three tile buffers — the next chunk's copies are
    in flight during this chunk's math); max_rows: query rows per internal slice (bounds the fp32 scratch
    and the score buffer: 16k rows ≈ 0.5 GB each at the paper shape and 128k)."""

    rows_cmp: int = 64  # H200 64k, packed summaries: 64 rows / 4 warps / 2 stages (2 programs an
    cmp_chunk: int = 64  # SM) cmp 23.5 ms; 128 / 8 / 3 (1 an SM) 24.9; 64 / 4 / 3 32.4
    score_bf16x3: int = 1  # block scores as three bf16 products (else fp32 "tf32x3" products)
    score_cat: int = 1  # with bf16x3: own and next chunk's blocks in one product of twice the width
    # With score_cat: p as 2 bf16 parts (16 mantissa bits) or 3 (fp32's 24). H200 64k: cmp 31.5 →
    # 28.8 ms with 2; 12 of the 262,144 (query, group) selections differed from 3 parts'.
    score_parts: int = 2
    # Block scores as weighted reshape-and-sums of p in fp32 registers (`_block_sums`, as the decode
    # kernel forms its tiles' scores) instead of the bf16 products above; used where a chunk is
    # whole pages (E | chunk) and an entry's spill stays within the next chunk. fp32 throughout (the
    # products keep 16 of p's 24 mantissa bits) at the products' speed: H200 64k, three runs in
    # turn, cmp 23.11 / 23.31 / 23.46 → 22.93 / 23.10 / 23.37 ms (prefill.md, twenty-sixth session).
    score_sums: int = 1
    # With score_sums: the group's heads summed before the overlap weights (they do not depend on
    # the head): one reduction over the heads instead of one per summary offset. H100 64k, three
    # runs: cmp 23.0–23.4 → 22.3–22.4 ms; same selections at 16k (prefill.md, fifty-first session).
    score_hsum: int = 1
    # The compressed kernel's two sweeps as two launches: the first stores each row's statistics
    # ([rows, Hq] fp32), the second reads them. The second alone needs 72 registers and 74 KB of
    # shared memory (sm_90, Triton 3.9) against the pair's 143 and 107 KB: three programs an SM instead of two.
    # H100 64k, three runs in turn: cmp 22.3–22.5 → 21.0–21.7 ms (prefill.md, fifty-first session).
    cmp_split: int = 1
    # With cmp_split: the second launch's query-tile rows and warps (0: the first's). Alone it
    # needs half the first's registers, so larger tiles still fit several programs an SM.
    # H100 64k, second sweep alone, three runs: 64 rows / 4 warps 9.30–9.43 ms, 128 / 8
    # 9.10–9.22 (prefill.md, fifty-first session).
    rows_cmp2: int = 128
    warps_cmp2: int = 8
    # With cmp_split (else ignored): the window branch (and the forced blocks) run in the first compressed
    # launch, after its sweep, for the same tile — q read once, acc written once, one launch
    # fewer — instead of in `_win_kernel` (rows_win, warps_win, stages_win then unused). H100 64k,
    # three rounds in turn: first launch + window kernel 26.5–27.7 ms → 26.1–26.2 in one
    # (255 registers, 40 B spilled in Triton 3.9's sm_90 compile), the call 47.7–48.3 → 46.9–47.1
    # (prefill.md, fifty-second session).
    win_fused: int = 1
    # Compressed kernel reads a contiguous copy of the visible summaries (one small gather launch
    # a call) through tensor descriptors: TMA tile copies on Hopper instead of per-thread gathered
    # addresses (0: page by page through the block table).
    cmp_packed: int = 1
    mask_split: int = 1  # compressed sweeps: no causal-mask math on chunks every row sees whole
    warps_cmp: int = 4
    stages_cmp: int = 2
    rows_win: int = 64
    warps_win: int = 4
    stages_win: int = 2  # 3 stages: 147 KB, one program an SM; 7.3 ms vs 5.1
    warps_slc: int = 2
    stages_slc: int = 2
    max_rows: int = 16384
    # The gated compressed + window sum handed to the selected-branch kernel ([rows, Hq, Dv], written,
    # read and written, read) in bf16 for bf16 inputs, else fp32: half its bytes, one more bf16
    # rounding (2.7e-3 relative to the fp32 sum's output at 64k, selections unchanged). H200, 64k,
    # paper shape, kernels summed: 51.9 → 50.8 ms (cmp 23.5 → 23.1, win 5.0 → 4.5, slc 21.2 → 20.9;
    # docs/benchmarks/prefill.md, twentieth session).
    acc_bf16: int = 1
    # The selected branch's forced blocks (first and most recent) attended by the window kernel for
    # a tile of queries at once, not by the selected-branch kernel a query at a time; shared K/V
    # only (an independent window reads other pages). H200, 64k, paper shape: slc 21.0 → 17.6 ms,
    # win 4.5 → 5.9, kernels 51.1 → 49.0 (docs/benchmarks/prefill.md, twenty-first session).
    forced_win: int = 1
    # Each selected-branch program takes its own top-n from the block scores (no top-n launch;
    # `_slc_kernel` TOPN). H200, paper shape: top-n + slc kernels 19.6 → 18.8 ms at 64k, 44.6 → 42.2
    # at 128k (docs/benchmarks/prefill.md, twenty-third session).
    slc_topn: int = 1
    # With slc_topn 0, the top-n kernel's passes run over groups of this many blocks first, then over
    # the best groups' blocks (0: over every block; `_select_rows`). A power of two. H200, paper
    # shape: top-n 2.03 → 1.57 ms at 64k, 6.83 → 4.59 at 128k.
    topn_groups: int = 16


DEFAULT_CONFIG = PrefillConfig()


def default_config(device) -> PrefillConfig:
    """DEFAULT_CONFIG on Hopper and newer. Before Hopper the compressed kernel's matrix operands
    live in registers (no wgmma) and several of the Hopper choices spill on sm_80 (`compile_check`,
    Triton 3.6): the packed reads (no TMA: 648 B), 64-row tiles at 4 warps (152 B), 3 stages, the
    unmasked loop, the top-n inside the selected-branch kernel (8 B). There it keeps the spill-free
    128 rows at 8 warps, 2 stages, the mask on every chunk, the page-by-page summary reads, the
    top-n kernel and the window kernel apart (not timed on an A100)."""
    if target_arch(torch.device(device)) >= 90:
        return DEFAULT_CONFIG
    return replace(DEFAULT_CONFIG, rows_cmp=128, warps_cmp=8, stages_cmp=2, mask_split=0, cmp_packed=0,
                   slc_topn=0, win_fused=0)


def _window_fused(cfg: PrefillConfig) -> bool:
    """The window branch runs in the first compressed launch (`win_fused`; only with `cmp_split`)."""
    return bool(cfg.cmp_split and cfg.win_fused)


def _tile_queries(cfg: PrefillConfig, GP: int) -> tuple[int, int, int]:
    """Queries a tile (BT) of the first compressed sweep, of the window kernel and of the second
    compressed sweep, for a group padded to GP heads: each launch's tile list has this many
    queries a tile (one list per distinct size)."""
    def bt(rows):
        return max(1, rows // GP)
    return (bt(cfg.rows_cmp), bt(cfg.rows_cmp if _window_fused(cfg) else cfg.rows_win),
            bt(cfg.rows_cmp2 if cfg.cmp_split and cfg.rows_cmp2 else cfg.rows_cmp))


def _tiles(cu, lens, r0, r1, BT) -> torch.Tensor:
    """int32 [tiles, 4]: (sequence, first row, rows, first position) of each BT-query tile within
    rows [r0, r1), last tiles first (later queries see more summaries: start the long tiles first)."""
    parts = []
    for b in range(len(lens)):
        lo, hi = max(cu[b], r0), min(cu[b + 1], r1)
        if hi <= lo:
            continue
        a = torch.arange(lo, hi, BT, dtype=torch.int32)
        parts.append(torch.stack([torch.full_like(a, b), a, (hi - a).clamp(max=BT),
                                  lens[b] - (cu[b + 1] - a)], 1))
    return torch.cat(parts).flip(0).contiguous()


def _check(q, gates, layer, block_tables, cu_seqlens_q, seq_lens, p, win_tables):
    _check_layer(q, gates, layer, p)
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape != (B + 1,) or block_tables.shape[0] != B:
        raise ValueError("cu_seqlens_q must be [B+1] and block_tables [B, max_pages] for B = len(seq_lens)")
    if win_tables is not None and win_tables.shape[0] != B:
        raise ValueError("win_tables must be [B, ring_pages]")


def _check_layer(q, gates, layer, p):
    if q.dim() != 3 or gates.shape != (q.shape[0], q.shape[1], 3):
        raise ValueError(f"q must be [Ttot, Hq, Dk] and gates [Ttot, Hq, 3]; got {tuple(q.shape)}, "
                         f"{tuple(gates.shape)}")
    npages, hkv, P, dk = layer.k_cache.shape
    if q.shape[2] != dk:
        raise ValueError(f"q head dim {q.shape[2]} != cache key dim {dk}")
    if q.shape[1] % hkv:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({hkv})")
    if P != p.select_block:
        raise ValueError(f"page size {P} must equal the selection block l' = {p.select_block}")
    if P % p.stride or layer.summaries_per_page != P // p.stride:
        raise ValueError(f"page size {P} must be a multiple of stride d = {p.stride} with P/d summaries "
                         f"per page (cache holds {layer.summaries_per_page})")
    if P < 16 or P & (P - 1):
        raise NotImplementedError(f"Triton prefill needs a power-of-two page size >= 16, got {P}")
    for name, t in (("k_cache", layer.k_cache), ("v_cache", layer.v_cache),
                    ("kc_cache", layer.kc_cache), ("vc_cache", layer.vc_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype} (fp32, fp16, bf16)")


@dataclass
class PrefillPlan:
    """Host-side layout of one `nsa_prefill` call: query tiles and row → (sequence, position)
    tables, uploaded to the device in one copy. It depends only on the chunk lengths, the page size,
    the group size and the tile config, so an engine step builds it once (from its host-side
    lengths: no device sync) and passes it to every layer's call."""

    cu: list[int]
    lens: list[int]
    page_size: int
    group: int
    config: PrefillConfig
    meta: torch.Tensor  # every slice's tile lists, row → sequence, row → position (int32)
    # Per row slice: (r0, r1, {queries a tile: (tiles, span in meta)}, spans in meta of row →
    # sequence and row → position, blocks NB); one tile list per distinct `_tile_queries` size.
    slices: list[tuple]
    pack: tuple | None = None  # with cmp_packed: (pages, spans in meta of pages / firsts / lengths)
    static: tuple | None = None  # `static_plan`'s (rows, sequences, pages)

    @property
    def total_rows(self) -> int:
        return self.cu[-1]


def plan_prefill(cu_seqlens_q, seq_lens, *, page_size: int, group: int, device,
                 config: PrefillConfig | None = None) -> PrefillPlan:
    """The `PrefillPlan` of a call with these chunk boundaries (cu_seqlens_q, [B + 1]) and lengths
    (seq_lens, [B], counting each chunk); lists or tensors (a device tensor costs one sync)."""
    cfg = config or default_config(device)
    cu = [int(x) for x in (cu_seqlens_q.tolist() if torch.is_tensor(cu_seqlens_q) else cu_seqlens_q)]
    lens = [int(x) for x in (seq_lens.tolist() if torch.is_tensor(seq_lens) else seq_lens)]
    if len(cu) != len(lens) + 1 or cu[0] != 0 or any(cu[b + 1] < cu[b] for b in range(len(lens))):
        raise ValueError(f"cu_seqlens_q must be [B+1] rising from 0, got {cu} for {len(lens)} sequences")
    for b, L in enumerate(lens):
        if cu[b + 1] - cu[b] > L:
            raise ValueError(f"sequence {b}: {cu[b + 1] - cu[b]} queries but seq_len {L}")
    Ttot, P = cu[-1], page_size
    sizes = sorted(set(_tile_queries(cfg, _pow2(group))))
    if Ttot == 0:
        return PrefillPlan(cu, lens, P, group, cfg, torch.empty(0, dtype=torch.int32, device=device), [])
    # Uploaded in one copy before the first launch: one synchronous upload per slice would wait for
    # the previous slice's kernels.
    counts = torch.tensor([cu[b + 1] - cu[b] for b in range(len(lens))], dtype=torch.long)
    row_seq_all = torch.repeat_interleave(torch.arange(len(lens)), counts)
    row_pos_all = (torch.tensor(lens, dtype=torch.long)[row_seq_all]
                   - (torch.tensor(cu[1:], dtype=torch.long)[row_seq_all] - torch.arange(Ttot)))
    parts, slices, off = [], [], 0

    def append(segs) -> list[tuple[int, int]]:
        """Add int32 segments to the one upload; their (start, end) spans in it."""
        nonlocal off
        spans = []
        for seg in segs:
            spans.append((off, off + seg.numel()))
            # Each segment starts 16-byte aligned: Triton specialises pointer arguments on their
            # alignment, so unaligned slices made extra kernel variants that depended on the tile
            # counts (scripts/check_precompile_coverage.py).
            pad = -seg.numel() % 4
            parts.extend([seg, seg.new_zeros(pad)] if pad else [seg])
            off += seg.numel() + pad
        return spans

    for r0 in range(0, Ttot, cfg.max_rows):
        r1 = min(Ttot, r0 + cfg.max_rows)
        lists = [_tiles(cu, lens, r0, r1, bt) for bt in sizes]
        spans = append([*(t.flatten() for t in lists), row_seq_all[r0:r1].int(), row_pos_all[r0:r1].int()])
        NB = -(-(int(row_pos_all[r0:r1].max()) + 1) // P)
        tiles = {bt: (len(t), span) for bt, t, span in zip(sizes, lists, spans)}
        slices.append((r0, r1, tiles, spans[len(sizes):], NB))
    pack = None
    if cfg.cmp_packed:
        # Every page of each sequence with queries in this call, in order: (sequence, slot) pairs,
        # each sequence's first pack page, and the lengths (which summaries are complete).
        npg = torch.tensor([-(-L // P) if cu[b + 1] > cu[b] else 0 for b, L in enumerate(lens)])
        firsts = torch.cumsum(npg, 0) - npg
        seqs = torch.repeat_interleave(torch.arange(len(lens)), npg)
        pairs = torch.stack([seqs, torch.arange(len(seqs)) - firsts[seqs]], 1)
        pack = (len(seqs), append([pairs.int().flatten(), firsts.int(), torch.tensor(lens, dtype=torch.int32)]))
    meta = torch.cat(parts).to(device)  # (pinning it cost more than the copy: ~4 ms at 8k on an H100)
    return PrefillPlan(cu, lens, P, group, cfg, meta, slices, pack)


def static_plan(rows: int, seqs: int, pages: int, *, page_size: int, group: int, device,
                config: PrefillConfig | None = None) -> PrefillPlan:
    """A plan of fixed shapes, for `nsa_prefill_static` calls captured in a CUDA graph and replayed
    with other chunks: q of `rows` rows, chunks of up to `seqs` sequences (the block table's rows)
    whose contexts span up to `pages` pages (its columns).

    Everything a grid or a buffer size depends on is fixed: the tile lists have room for the most
    tiles such a call can have (Σ ⌈T_b/BT⌉ ≤ rows // BT + seqs), the selected-branch grid covers
    every row, the block scores have `pages` columns. `static_layout` writes a call's chunks into
    the plan's host image, to be copied to `plan.meta` before the replay: tiles past the call's
    own have no rows (their programs store nothing), and rows outside its chunks have position −1
    (the selected-branch programs leave their output rows as they are). The summaries are read
    through the block table (`cmp_packed` off: the pack launch's grid follows the contexts).
    Made with every row outside any chunk."""
    cfg = replace(config or default_config(device), cmp_packed=0)
    if not 0 < rows <= cfg.max_rows or seqs < 1 or pages < 1:
        raise ValueError(f"static plans need 0 < rows <= {cfg.max_rows}, seqs >= 1 and pages >= 1; got "
                         f"{rows}, {seqs}, {pages}")
    sizes = sorted(set(_tile_queries(cfg, _pow2(group))))
    counts = [rows // bt + seqs for bt in sizes]
    spans, off = [], 0
    for n in (*(4 * c for c in counts), rows, rows):  # tile lists, row → sequence, row → position
        spans.append((off, off + n))
        off += n - n % -4  # 16-byte aligned segments, as plan_prefill's
    tiles = {bt: (c, span) for bt, c, span in zip(sizes, counts, spans)}
    plan = PrefillPlan([0], [], page_size, group, cfg, torch.empty(off, dtype=torch.int32, device=device),
                       [(0, rows, tiles, spans[len(sizes):], pages)], static=(rows, seqs, pages))
    plan.meta.copy_(torch.from_numpy(static_layout(plan, [0], [])))
    return plan


def static_layout(plan: PrefillPlan, cu_seqlens_q, seq_lens, row0: int = 0,
                  out: "np.ndarray | None" = None) -> "np.ndarray":
    """The host image of `plan.meta` (a `static_plan`) for a call whose chunks are rows
    row0 + cu_seqlens_q[b] … row0 + cu_seqlens_q[b + 1] − 1 of q, of lengths seq_lens (host lists;
    chunk b uses block-table row b). Written into `out` (int32, plan.meta's size) or a new array."""
    rows, seqs, pages = plan.static
    cu, lens = [int(x) for x in cu_seqlens_q], [int(x) for x in seq_lens]
    B = len(lens)
    if len(cu) != B + 1 or cu[0] != 0 or any(cu[b + 1] < cu[b] for b in range(B)):
        raise ValueError(f"cu_seqlens_q must be [B+1] rising from 0, got {cu} for {B} sequences")
    if B > seqs or row0 < 0 or row0 + cu[-1] > rows:
        raise ValueError(f"{B} chunks of rows {row0} … {row0 + cu[-1] - 1} do not fit a static plan of {seqs} "
                         f"sequences and {rows} rows")
    for b, L in enumerate(lens):
        if cu[b + 1] - cu[b] > L or -(-L // plan.page_size) > pages:
            raise ValueError(f"sequence {b}: {cu[b + 1] - cu[b]} queries and seq_len {L} do not fit "
                             f"(at most seq_len queries, {pages} pages)")
    if out is None:
        out = np.empty(plan.meta.numel(), dtype=np.int32)
    _, _, lists, ((s0, s1), (p0, p1)), _ = plan.slices[0]
    for bt, (_, (a, b_)) in lists.items():
        tiles = out[a:b_].reshape(-1, 4)
        tiles[:] = 0  # no rows: a program that stores nothing
        parts = []
        for b in range(B):
            lo, hi = cu[b], cu[b + 1]
            if hi > lo:
                r = np.arange(lo, hi, bt)
                parts.append(np.stack([np.full_like(r, b), row0 + r, np.minimum(hi - r, bt), lens[b] - (hi - r)], 1))
        if parts:  # last tiles first, as plan_prefill's (later queries see more summaries)
            t = np.concatenate(parts)[::-1]
            tiles[:len(t)] = t
    row_seq, row_pos = out[s0:s1], out[p0:p1]
    row_seq[:] = 0
    row_pos[:] = -1
    for b in range(B):
        T = cu[b + 1] - cu[b]
        row_seq[row0 + cu[b]:row0 + cu[b + 1]] = b
        row_pos[row0 + cu[b]:row0 + cu[b + 1]] = np.arange(lens[b] - T, lens[b])
    return out


def nsa_prefill_static(q, gates, layer: PagedLayerCache, block_tables, p: SparsityParams, plan: PrefillPlan,
                       out, scale=None, win_tables=None) -> None:
    """`nsa_prefill` over a `static_plan`: writes the rows of `out` [rows, Hq, Dv] that the plan's
    current layout (`static_layout`, copied to plan.meta) puts in chunks, and no other. q, gates,
    out: the plan's rows; block_tables [seqs, ≥ pages] int32. No host sync, no host-dependent
    shape: capturable in a CUDA graph. `win_tables` [seqs, ring pages] int32 (independent-K/V
    checkpoints): the window branch reads its ring, as in `nsa_prefill`; the ring must hold
    ≥ w + T_b − 1 tokens for every chunk a layout holds (not checked here: the layouts change
    between replays; the engine sizes rings for its longest chunk)."""
    if plan.static is None:
        raise ValueError("nsa_prefill_static needs a plan from static_plan")
    rows, seqs, pages = plan.static
    _check_layer(q, gates, layer, p)
    _, Hkv, P, _ = layer.k_cache.shape
    if (P, q.shape[1] // Hkv) != (plan.page_size, plan.group):
        raise ValueError(f"plan was made for page size {plan.page_size} and group {plan.group}; this call has "
                         f"{P} and {q.shape[1] // Hkv}")
    if q.shape[0] != rows or out.shape != (rows, q.shape[1], layer.v_cache.shape[-1]) or out.dtype != q.dtype:
        raise ValueError(f"q and out must have the plan's {rows} rows (out [rows, Hq, Dv] in q's dtype); got "
                         f"{tuple(q.shape)} and {tuple(out.shape)} {out.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] < seqs or block_tables.shape[1] < pages \
            or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be int32 [>= {seqs}, >= {pages}] with contiguous rows, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if q.stride(2) != 1 or gates.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("q, gates and out need a contiguous last dim")
    wt, ring_pages = block_tables, 1 << 30
    if win_tables is not None:
        if win_tables.dim() != 2 or win_tables.shape[0] < seqs or win_tables.dtype != torch.int32 \
                or win_tables.stride(1) != 1:
            raise ValueError(f"win_tables must be int32 [>= {seqs}, ring pages] with contiguous rows, got "
                             f"{win_tables.dtype} {tuple(win_tables.shape)}")
        if win_tables.shape[1] * P < p.window:
            raise ValueError(f"window ring of {win_tables.shape[1] * P} tokens is shorter than the window "
                             f"w = {p.window}")
        wt, ring_pages = win_tables, win_tables.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[2])
    _launch(q, gates, layer, block_tables, wt, ring_pages, p, plan, plan.config, out, None, scale)


def nsa_prefill(q, gates, layer: PagedLayerCache, block_tables, cu_seqlens_q, seq_lens,
                p: SparsityParams, win_tables=None, scale=None, *, config: PrefillConfig | None = None,
                return_selection: bool = False, plan: PrefillPlan | None = None):
    """NSA attention for a varlen batch of prompt chunks over the paged cache.

    Same arguments and result as `paged.paged_nsa_attention_ref`: q [Ttot, Hq, Dk], gates
    [Ttot, Hq, 3] → [Ttot, Hq, Dv] in q's dtype. With `win_tables` (independent-K/V checkpoints) the
    window branch reads its ring, which must hold ≥ w + T_b − 1 tokens for a chunk of T_b queries
    (a shorter ring has already lost keys the chunk's first queries need).
    `return_selection=True` also returns the selected block ids [Ttot, Hkv, n] (−1 = none).
    One host sync reads cu_seqlens_q / seq_lens to lay out the tiles (prefill is not graph-captured),
    unless `plan` (`plan_prefill` of the same lengths, page size, group size and config) is given:
    an engine step builds it once from its host-side lengths for all layers.
    """
    cfg = config or default_config(q.device)
    if cfg.score_parts not in (2, 3):
        raise ValueError(f"score_parts must be 2 or 3 (bf16 parts of p), got {cfg.score_parts}")
    if cfg.topn_groups < 0 or cfg.topn_groups & (cfg.topn_groups - 1):
        raise ValueError(f"topn_groups must be 0 or a power of two, got {cfg.topn_groups}")
    _check(q, gates, layer, block_tables, cu_seqlens_q, seq_lens, p, win_tables)
    dev = q.device
    Ttot, Hq, Dk = q.shape
    _, Hkv, P, _ = layer.k_cache.shape
    Dv = layer.v_cache.shape[-1]
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    out = torch.empty(Ttot, Hq, Dv, dtype=q.dtype, device=dev)
    sel = torch.empty(Ttot, Hkv, p.num_select, dtype=torch.int32, device=dev) if return_selection else None
    if Ttot == 0:
        return (out, sel) if return_selection else out

    q = q.contiguous()
    gates = gates.contiguous()
    block_tables = block_tables.to(device=dev, dtype=torch.int32).contiguous()
    if plan is None:
        plan = plan_prefill(cu_seqlens_q, seq_lens, page_size=P, group=G, device=dev, config=cfg)
    elif (plan.page_size, plan.group, plan.config, len(plan.lens)) != (P, G, cfg, seq_lens.shape[0]):
        raise ValueError(f"plan was made for page size {plan.page_size}, group {plan.group}, "
                         f"{len(plan.lens)} sequences and {plan.config}; this call has {P}, {G}, "
                         f"{seq_lens.shape[0]} and {cfg}")
    cu, lens = plan.cu, plan.lens
    if cu[-1] != Ttot:
        raise ValueError(f"cu_seqlens_q must rise from 0 to Ttot={Ttot}, got {cu}")
    for b, L in enumerate(lens):
        T = cu[b + 1] - cu[b]
        if T and -(-L // P) > block_tables.shape[1]:
            raise ValueError(f"sequence {b}: seq_len {L} needs {-(-L // P)} pages, table has "
                             f"{block_tables.shape[1]}")
    if win_tables is not None:
        win_tables = win_tables.to(device=dev, dtype=torch.int32).contiguous()
        ring = win_tables.shape[1] * P
        if ring < p.window:
            raise ValueError(f"window ring of {ring} tokens is shorter than the window w = {p.window}")
        for b, L in enumerate(lens):
            T = cu[b + 1] - cu[b]
            if T and L > ring and ring < p.window + T - 1:
                raise ValueError(
                    f"sequence {b}: a chunk of {T} queries needs a window ring of >= w + T - 1 = "
                    f"{p.window + T - 1} tokens, the ring holds {ring}; use shorter chunks or a longer ring")
        wt, ring_pages = win_tables, win_tables.shape[1]
    else:
        wt, ring_pages = block_tables, 1 << 30
    _launch(q, gates, layer, block_tables, wt, ring_pages, p, plan, cfg, out, sel, scale)
    return (out, sel) if return_selection else out


def _launch(q, gates, layer: PagedLayerCache, block_tables, wt, ring_pages: int, p: SparsityParams,
            plan: PrefillPlan, cfg: PrefillConfig, out, sel, scale: float) -> None:
    """The launches of a checked call: every slice of `plan`, results into `out` (and `sel`)."""
    dev = q.device
    Hq, Dk = q.shape[1], q.shape[2]
    _, Hkv, P, _ = layer.k_cache.shape
    Dv = layer.v_cache.shape[-1]
    G = Hq // Hkv
    E = P // p.stride
    win_tables = wt if ring_pages != 1 << 30 else None

    # Tile shapes.
    DK1, DK2 = split_head_dim(Dk)
    DVP = max(16, _pow2(Dv))
    GP = _pow2(G)
    BT, BTW, BT2 = _tile_queries(cfg, GP)
    BN = max(16, _pow2(cfg.cmp_chunk))
    CN = (BN // E) * E if BN >= E else 0
    if CN == 0:
        raise NotImplementedError(f"summary chunk {BN} smaller than summaries per page {E}")
    BJE = CN // E
    BJ = max(16, _pow2(BJE))
    if p.block - p.stride > CN * p.stride:
        raise NotImplementedError("compression block too long for one chunk of spill (l − d > chunk·d)")
    # Blocks a summary's tokens reach from its page's own (KSPAN). The in-register block sums need
    # whole pages a chunk and the spill within the next chunk; else the scores are products.
    KSPAN = ((E - 1) * p.stride + p.block - 1) // P + 1
    sums = bool(cfg.score_sums) and CN == BN and KSPAN - 1 <= BJE
    GP_SLC = max(16, GP)
    NSP = max(2, _pow2(p.num_select))
    fp32 = q.dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    sprec = "ieee" if _INTERPRET else "tf32x3"  # block scores decide the ranking: keep fp32 accuracy
    upcast = _INTERPRET  # the interpreter multiplies bf16 bit patterns: compute its dots in fp32
    qk_scale = scale * LOG2E
    kc, vc, kcc, vcc = layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache

    meta = plan.meta
    kd1 = kd2 = vd = pack_first = None
    pack_rows = 0
    if plan.pack is not None:
        npk, (pages_span, first_span, lens_span) = plan.pack
        pack_rows = npk * E
        DKW = DK1 + DK2  # row width: a multiple of 16 elements (descriptor strides: 16-byte multiples)
        kpack = torch.empty(Hkv * pack_rows, DKW, dtype=q.dtype, device=dev)
        vpack = torch.empty(Hkv * pack_rows, DVP, dtype=q.dtype, device=dev)
        _pack_kernel[(npk, Hkv)](
            kcc, vcc, block_tables, meta[pages_span[0]:pages_span[1]], meta[lens_span[0]:lens_span[1]],
            kpack, vpack, kcc.stride(0), kcc.stride(1), kcc.stride(2), vcc.stride(0), vcc.stride(1),
            vcc.stride(2), block_tables.stride(0), pack_rows,
            DK=Dk, DK1=DK1, DK2=DK2, DV=Dv, DVP=DVP, E=E, D=p.stride, L=p.block, num_warps=4,
        )
        kd1 = TensorDescriptor.from_tensor(kpack, [CN, DK1])
        kd2 = TensorDescriptor.from_tensor(kpack, [CN, max(DK2, 16)])
        vd = TensorDescriptor.from_tensor(vpack, [CN, DVP])
        pack_first = meta[first_span[0]:first_span[1]]
    acc_dt = torch.bfloat16 if cfg.acc_bf16 and q.dtype == torch.bfloat16 else torch.float32
    forced = bool(cfg.forced_win) and win_tables is None
    fuse_win = _window_fused(cfg)
    for r0, r1, lists, rowmap, NB in plan.slices:
        rows = r1 - r0
        row_seq, row_pos = (meta[a:b] for a, b in rowmap)
        acc = torch.empty(rows, Hq, Dv, dtype=acc_dt, device=dev)
        scores = torch.empty(rows, Hkv, NB, dtype=torch.float32, device=dev)
        idx = torch.empty(rows, Hkv, p.num_select, dtype=torch.int32, device=dev)
        if forced:
            fm = torch.empty(rows, Hq, dtype=torch.float32, device=dev)
            fo = torch.empty_like(acc)  # the layout of acc: the kernels index both alike
        else:
            fm = fo = acc  # not read

        # Both compressed sweeps in one launch, or (cmp_split) the first in one that stores each
        # row's statistics and the second in another that reads them.
        lse = torch.empty(rows, Hq, dtype=torch.float32, device=dev) if cfg.cmp_split else scores
        for sweeps in ((1, 2) if cfg.cmp_split else (3,)):
            bt = BT2 if sweeps == 2 else BT
            ntiles, (a, b_) = lists[bt]
            _cmp_kernel[(ntiles, Hkv)](
                q, gates, acc, scores, kcc, vcc, block_tables, meta[a:b_], kd1, kd2, vd, pack_first, pack_rows, lse,
                q.stride(0), q.stride(1), gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1),
                scores.stride(0), scores.stride(1), lse.stride(0),
                kcc.stride(0), kcc.stride(1), kcc.stride(2), vcc.stride(0), vcc.stride(1), vcc.stride(2),
                block_tables.stride(0), r0, qk_scale,
                kc, vc, wt, fm, fo, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1),
                vc.stride(2), wt.stride(0), ring_pages, Hq,
                G=G, GP=GP, BT=bt, DK=Dk, DK1=DK1, DK2=DK2, DV=Dv, DVP=DVP, P=P, E=E,
                D=p.stride, L=p.block, BN=BN, CN=CN, BJ=BJE if sums else BJ, BJE=BJE, PREC=prec, SPREC=sprec,
                UPCAST=upcast, BF16X3=bool(cfg.score_bf16x3) and min(p.block, P) <= 256,
                SCAT=bool(cfg.score_cat), MASK_SPLIT=bool(cfg.mask_split), PARTS=cfg.score_parts,
                PACKED=plan.pack is not None, SUMS=sums, KSPAN=KSPAN, HSUM=bool(cfg.score_hsum), SWEEPS=sweeps,
                WIN=fuse_win and sweeps == 1, W=p.window, FORCED=forced, NUM_INIT=p.num_init,
                NUM_LOCAL=p.num_local,
                num_warps=cfg.warps_cmp2 if sweeps == 2 and cfg.warps_cmp2 else cfg.warps_cmp,
                num_stages=cfg.stages_cmp,
            )
        if not fuse_win:
            nwtiles, (a, b_) = lists[BTW]
            _win_kernel[(nwtiles, Hkv)](
                q, gates, acc, kc, vc, wt, meta[a:b_], block_tables, fm, fo,
                q.stride(0), q.stride(1), gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1),
                kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
                wt.stride(0), ring_pages, block_tables.stride(0), Hq, r0, qk_scale,
                G=G, GP=GP, BT=BTW, DK=Dk, DK1=DK1, DK2=DK2, DV=Dv, DVP=DVP, P=P, W=p.window,
                PREC=prec, UPCAST=upcast, FORCED=forced, NUM_INIT=p.num_init, NUM_LOCAL=p.num_local,
                num_warps=cfg.warps_win, num_stages=cfg.stages_win,
            )
        NBP = max(16, _pow2(NB))
        RB = max(1, min(16, 4096 // NBP))
        # Groups only where they leave the passes fewer keys than the blocks themselves.
        GS = cfg.topn_groups if cfg.topn_groups and NBP >= 2 * NSP * cfg.topn_groups else 0
        if not cfg.slc_topn:
            _topn_kernel[(triton.cdiv(rows, RB), Hkv)](
                scores, idx, row_pos, rows, scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
                NSEL=p.num_select, NUM_INIT=p.num_init, NUM_LOCAL=p.num_local, P=P,
                NBP=NBP, NSP=NSP, RB=RB, GS=GS, num_warps=4,
            )
        _slc_kernel[(rows, Hkv)](
            q, gates, acc, out, idx, row_seq, row_pos, kc, vc, block_tables, fm, fo,
            q.stride(0), q.stride(1), gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1),
            out.stride(0), out.stride(1), idx.stride(0), idx.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            block_tables.stride(0), Hq, r0, qk_scale,
            G=G, GP=GP_SLC, DK=Dk, DK1=DK1, DK2=DK2, DV=Dv, DVP=DVP, P=P, NSEL=p.num_select,
            PREC=prec, UPCAST=upcast, FORCED=forced, NUM_INIT=p.num_init, NUM_LOCAL=p.num_local,
            score_ptr=scores, ss_t=scores.stride(0), ss_h=scores.stride(1), TOPN=bool(cfg.slc_topn),
            NBP=NBP, NSP=NSP, num_warps=cfg.warps_slc, num_stages=cfg.stages_slc,
        )
        if sel is not None:
            sel[r0:r1] = idx
