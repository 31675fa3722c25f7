"""Triton NSA decode over the paged cache: one new token per sequence, three launches per layer
(four when the splits are many, at small batch).

Equals `paged.paged_nsa_attention_ref(q, gates, layer, block_tables, arange(B + 1), seq_lens, p,
win_tables, scale)` (tested on fresh random inputs; see docs/kernels_decode.md). Launches:

1. `_cmp_tile_kernel`, grid (B·Hkv, splits): a program walks a run of tiles (BN compressed
   entries = whole pages each) of one kv group in one flat, software-pipelined loop, loads their
   summaries through the block table once for all G query heads (dk = 192 as 128 + 64 dots), and
   writes (a) the compressed branch's partial softmax state for its run and (b) per tile, partial
   selection scores Σ_i w_ij·exp(s_hi − m_h): entry r of a page overlaps the page's block + k with a
   fixed weight W[r, k] (`reference.selection_weights`), so they are KSPAN reshape-and-sums of p,
   no matmul. Scores stay per head: they can only be summed over the group once each head's
   global softmax normaliser is known. Values after keys (the default from batch 3 with PDL,
   `_values_after_keys`): a program reads its tiles' keys first (storing p), counts itself done
   for the score kernel, and only then reads their values, so the scores overlap the value reads.
2. `_score_kernel`, grid (B·Hkv, runs of TT compressed tiles): merges the per-head normalisers
   and sums the partial scores over the group's heads with one factor exp(m_tile − M_h) / L_h per
   (head, tile), into per-page rows part_k (block j's score is Σ_k part_k[j − k]: entries of page
   j − k spill k blocks forward). Each program forms its own blocks' scores, forces the
   initial/local blocks and keeps the top-n of packed (score bits, −index) int64 keys (Triton's
   bitonic top-k), so ties go to the lower block index, the reference's rule; the group's
   last-arriving program (an atomic arrival counter) takes the top-n of those candidates and
   writes the group's work list (with values after keys, the programs wait for their group's
   key-split count instead of the whole pass): the n selected pages, then the window's
   pages, as (logical page, physical page) pairs; with shared K/V a window page that is also
   selected is dropped from the list (it is read once, as a selection, and feeds both branches).
3. `_attend_kernel`, grid (B·Hkv, splits): each program attends to its share of the work list. Each
   branch is its own softmax, exactly as the reference computes them; with independent K/V
   (`win_tables`) the window's pages come from the ring. When the splits are few (batch ≥ ~16 at
   64k) the group's last-arriving split merges every split's partial states of the three branches
   and writes the gated output.
4. Otherwise `_combine_kernel` (in _triton_utils), grid (B·Hq), does that merge.

Everything is sized from tensor shapes (never from tensor values), so there is no host sync and the
whole call can be captured in a CUDA graph (tested: capture, change q and seq_lens, replay). The
arrival counters live in a per-device buffer that the last arriving program of each group resets.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import (NEG, _combine_kernel, _dot, _load_q_halves, _online_softmax_step,
                            check_last_dim_contiguous, dot_precision, interpreter_upcast,
                            next_pow2, pdl_enabled, pipeline_smem_budget, set_carveout,
                            target_programs, topn_block, topn_key, triton_release)
from .paged import PagedLayerCache
from .reference import SparsityParams


@triton.jit
def _cmp_tile_kernel(q_ptr, sq_b, sq_h, kc_ptr, skc_p, skc_h, skc_e, vc_ptr, svc_p, svc_h, svc_e,
                     bt_ptr, sbt_b, lens_ptr, pm_ptr, pl_ptr, pacc_ptr, pms_ptr, psc_ptr, pp_ptr, kcnt_ptr,
                     scale, Hkv,
                     MAXT, NSPLIT,
                     G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DK0: tl.constexpr,
                     DK1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_L: tl.constexpr,
                     STRIDE: tl.constexpr, PAGE: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
                     PPT: tl.constexpr, KSPAN: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr, PDL: tl.constexpr, READ_EV: tl.constexpr = "",
                     KEEP_EV: tl.constexpr = "", VAFTER: tl.constexpr = False):
    """Program (group, split) walks tiles [split·T, split·T + T) of BN compressed entries, T =
    ⌈tiles / NSPLIT⌉ of this sequence: the splits share the sequence's own tiles, not the table's
    width (inside a CUDA graph the tables are as wide as the longest sequence the graph serves, so
    a short sequence would leave all its tiles to the first split or two).

    One flat loop (no inner chunk loop) so `tl.range(num_stages=STAGES)` can prefetch the next
    tiles' table entries and summaries while this tile computes. dk is two power-of-two dots
    (DK0 + DK1, e.g. 192 = 128 + 64) instead of one padded to the next power of two.

    Selection scores: a tile holds whole pages (BN is a multiple of E = l'/d), and entry r of a page
    overlaps the page's block + k with the fixed weight W[r, k] (k < KSPAN), so the tile's partial
    scores are KSPAN reshape-and-sums of p: [GP, BN] → [GP, BN/E, E] · W[:, k] → [GP, BN/E],
    stored per tile with the running max they are relative to (pms); the score kernel adds page
    jp's k-th row into block jp + k.

    READ_EV / KEEP_EV: L2 eviction hints ("" = none) for the summary reads and for the partial
    results the score kernel reads next (CMP_EVICT).

    VAFTER (values after keys, `_values_after_keys`): the loop reads key summaries only and stores
    each tile's p = exp(s − m) in q's dtype (pp, [B·Hq, MAXT·BN]: the rounding the p·V dot applies
    anyway). The program then stores its softmax state, counts itself in kcnt (per group) and lets
    the score kernel launch; its score programs wait for that count, not for this whole grid. Only
    then does the program read its tiles' value summaries, with its p read back, so the score sums
    and top-n run while the values stream in."""
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel before
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    L = tl.load(lens_ptr + b)
    n_cmp = tl.where(L >= BLOCK_L, (L - BLOCK_L) // STRIDE + 1, 0)
    n_tiles = (n_cmp + BN - 1) // BN
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kh * G + g
    rows = b * (Hkv * G) + heads  # [GP] rows of the [B, Hq] partial buffers
    d0 = tl.arange(0, DK0)
    dv = tl.arange(0, DVP)
    lpg = tl.arange(0, PPT)
    rr = tl.arange(0, E)
    q0, q1 = _load_q_halves(q_ptr, b * sq_b + heads * sq_h, gmask, DK, DK0, DK1)
    if DK1 > 0:
        d1 = DK0 + tl.arange(0, DK1)
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    tps = (n_tiles + NSPLIT - 1) // NSPLIT
    t_lo = split * tps
    t_hi = tl.minimum(t_lo + tps, n_tiles)
    # Page ids are loaded one tile ahead (carried): summary addresses that come from a load in the
    # same iteration would cost the software pipeliner a stage, leaving a single buffer so a tile's
    # loads could not overlap the previous tile's math.
    i_n = t_lo * BN + tl.arange(0, BN)
    page_n = tl.load(bt_ptr + b * sbt_b + i_n // E, mask=i_n < n_cmp, other=0)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        i = t * BN + tl.arange(0, BN)
        valid = i < n_cmp
        page = page_n.to(tl.int64)
        page_n = tl.load(bt_ptr + b * sbt_b + (i + BN) // E, mask=i + BN < n_cmp, other=0)
        row = i % E
        kbase = kc_ptr + page[:, None] * skc_p + kh * skc_h + row[:, None] * skc_e
        k0 = tl.load(kbase + d0[None, :], mask=valid[:, None] & (d0[None, :] < DK), other=0.0,
                     eviction_policy=READ_EV)
        if not VAFTER:
            v = tl.load(vc_ptr + page[:, None] * svc_p + kh * svc_h + row[:, None] * svc_e + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0, eviction_policy=READ_EV)
        s = _dot(q0, tl.trans(k0), PREC, UPCAST)
        if DK1 > 0:
            k1 = tl.load(kbase + d1[None, :], mask=valid[:, None] & (d1[None, :] < DK), other=0.0,
                         eviction_policy=READ_EV)
            s += _dot(q1, tl.trans(k1), PREC, UPCAST)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        if VAFTER:
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            l = l * tl.exp(m - m_new) + tl.sum(p, 1)
            m = m_new
            # Whole tiles (p = 0 past the entries): the value loop reads them back unmasked.
            tl.store(pp_ptr + rows[:, None] * (MAXT * BN) + i[None, :], p.to(pp_ptr.dtype.element_ty),
                     mask=gmask[:, None], eviction_policy=KEEP_EV)
        else:
            m, l, acc, p = _online_softmax_step(m, l, acc, s, v, PREC, UPCAST)
        p3 = tl.reshape(p, [GP, PPT, E])
        base = psc_ptr + ((rows * MAXT + t) * KSPAN)[:, None] * PPT + lpg[None, :]
        for k in tl.static_range(KSPAN):
            # Tokens entry r of a page shares with the page's block + k, divided by d (as
            # reference.selection_weights).
            w = tl.maximum(tl.minimum(rr * STRIDE + BLOCK_L, (k + 1) * PAGE)
                           - tl.maximum(rr * STRIDE, k * PAGE), 0).to(tl.float32) / STRIDE
            sc = tl.sum(p3 * w[None, None, :], 2)
            tl.store(base + k * PPT, sc, mask=gmask[:, None], eviction_policy=KEEP_EV)
        tl.store(pms_ptr + rows * MAXT + t, m, mask=gmask, eviction_policy=KEEP_EV)
    if PDL and not VAFTER:  # the score kernel may be launched now (it waits for this grid to finish)
        tl.extra.cuda.gdc_launch_dependents()
    o = rows * NSPLIT + split
    tl.store(pm_ptr + o, m, mask=gmask, eviction_policy=KEEP_EV)
    tl.store(pl_ptr + o, l, mask=gmask, eviction_policy=KEEP_EV)
    if VAFTER:
        # This split's keys are done: count it for the group's score programs (the barrier orders
        # the CTA's stores before the release), let them launch, then read the values.
        tl.debug_barrier()
        tl.atomic_add(kcnt_ptr + pid, 1, sem="release")
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        acc = _tile_values(vc_ptr, svc_p, svc_h, svc_e, bt_ptr, sbt_b, pms_ptr, pp_ptr, b, kh, rows, gmask,
                           n_cmp, t_lo, t_hi, m, MAXT, GP, DV, DVP, E, BN, STAGES, PREC, UPCAST)
    tl.store(pacc_ptr + o[:, None] * DV + dv[None, :], acc.to(pacc_ptr.dtype.element_ty),
             mask=gmask[:, None] & (dv[None, :] < DV))


@triton.jit
def _score_group(lens_ptr, pm_ptr, pl_ptr, Hkv, NSPLIT, G: tl.constexpr, GP: tl.constexpr,
                 BLOCK_L: tl.constexpr, STRIDE: tl.constexpr, BN: tl.constexpr, NSPLIT_P: tl.constexpr):
    """What both score kernels start from: the program's group (b, kh), its sequence length and
    compressed-tile count, the group's rows, and each head's merged softmax normaliser of the
    compressed branch (max mx and 1 / sum, 0 without entries) from the splits' partials."""
    pid = tl.program_id(0)
    b = pid // Hkv
    kh = pid % Hkv
    L = tl.load(lens_ptr + b)
    n_cmp = tl.where(L >= BLOCK_L, (L - BLOCK_L) // STRIDE + 1, 0)
    n_tiles = (n_cmp + BN - 1) // BN
    g = tl.arange(0, GP)
    gmask = g < G
    rows = b * (Hkv * G) + kh * G + g
    cidx = tl.arange(0, NSPLIT_P)
    cmask = gmask[:, None] & (cidx[None, :] < NSPLIT)
    cm = tl.load(pm_ptr + rows[:, None] * NSPLIT + cidx[None, :], mask=cmask, other=NEG)
    mx = tl.max(cm, 1)
    cl = tl.load(pl_ptr + rows[:, None] * NSPLIT + cidx[None, :], mask=cmask, other=0.0)
    tot = tl.sum(cl * tl.exp(cm - mx[:, None]), 1)
    inv = tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)
    return pid, b, L, n_tiles, gmask, rows, mx, inv


@triton.jit
def _tile_factors(pms_ptr, rows, gmask, mx, inv, t, tok, MAXT):
    """exp(m_tile − M_h) / L_h for tiles t [TT] of the group's heads → [GP, TT]; 0 where not tok
    (tiles past the sequence's entries were not written this call) and without entries (inv = 0)."""
    mt = tl.load(pms_ptr + rows[:, None] * MAXT + t[None, :], mask=gmask[:, None] & tok[None, :], other=NEG)
    return tl.exp(mt - mx[:, None]) * inv[:, None]


# Run-time sizes that vary with the table width are not specialised on (divisible by 16, equal
# to 1): eager decode steps would compile a variant per combination (it only moves addresses).
@triton.jit(do_not_specialize=["MAXT", "NSPLIT", "NPROG", "SROW"])
def _score_kernel(lens_ptr, pm_ptr, pl_ptr, pms_ptr, psc_ptr, part_ptr, bt_ptr, sbt_b,
                  sel_ptr, ulp_ptr, uph_ptr, cnt_ptr, cand_ptr, edge_ptr, kcnt_ptr, Hkv, MAXT, NSPLIT, NPROG, SROW,
                  G: tl.constexpr, GP: tl.constexpr, BLOCK_L: tl.constexpr, STRIDE: tl.constexpr,
                  PAGE: tl.constexpr, BN: tl.constexpr, PPT: tl.constexpr, KSPAN: tl.constexpr,
                  NSPLIT_P: tl.constexpr, TT: tl.constexpr, NBP: tl.constexpr,
                  NSEL: tl.constexpr, NSP: tl.constexpr, NUM_INIT: tl.constexpr,
                  NUM_LOCAL: tl.constexpr, TOPN: tl.constexpr, NPROG_P: tl.constexpr, KFLAG: tl.constexpr,
                  PDL: tl.constexpr):
    """Program (group, p) sums the group's partial scores of compressed tiles [p·TT, p·TT + TT) over
    the heads: part_k[page] = Σ_h psc[h, tile, k, page] · exp(m_{h,tile} − M_h) / L_h, one factor
    per (head, tile) — so the loads are contiguous [G, TT, PPT] runs and there is one exp per
    (head, tile), not per (head, block). Block j's score is Σ_k part_k[j − k] (entries of page
    j − k spill k blocks forward), formed by the group's last-arriving program, which then takes
    the top-n and writes the work list (`_select_units`). With PDL, the attention kernel may
    launch once every program is past its wait, so its programs read their window pages while the
    top-n runs (later triggers measured slower: docs/benchmarks/decode.md, ninth round).

    TOPN 2 ("cand"): each program also forms its own blocks' scores and keeps their top-n keys as
    candidates, so the last-arriving program takes the top-n of NPROG·n candidates instead of every
    block (each block of the group's top-n is in its own program's top-n). A block's spill from
    the page before the program's first comes from the previous tile's partial scores, summed here
    (`edge`) because the previous program may not have stored its part yet."""
    if KFLAG:  # the pass reads values after keys: wait for this group's key splits only
        _wait_count(kcnt_ptr + tl.program_id(0), NSPLIT)
    if PDL:
        if not KFLAG:
            tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # after the wait: see nsa_decode_tuned
    prog = tl.program_id(1)
    pid, b, L, n_tiles, gmask, rows, mx, inv = _score_group(lens_ptr, pm_ptr, pl_ptr, Hkv, NSPLIT, G, GP,
                                                            BLOCK_L, STRIDE, BN, NSPLIT_P)
    t = prog * TT + tl.arange(0, TT)
    tok = t < n_tiles  # tiles past the sequence's entries were not written this call: read as 0
    f = _tile_factors(pms_ptr, rows, gmask, mx, inv, t, tok, MAXT)  # [GP, TT]
    pg = tl.arange(0, PPT)
    for k in tl.static_range(KSPAN):
        sv = tl.load(psc_ptr + ((rows[:, None, None] * MAXT + t[None, :, None]) * KSPAN + k) * PPT
                     + pg[None, None, :], mask=gmask[:, None, None] & tok[None, :, None], other=0.0)
        part = tl.sum(sv * f[:, :, None], 0)  # [TT, PPT]
        tl.store(part_ptr + (pid * KSPAN + k) * SROW + t[:, None] * PPT + pg[None, :], part,
                 mask=(t < MAXT)[:, None])
    cur = (L - 1) // PAGE
    if TOPN == 2:
        BLK: tl.constexpr = TT * PPT
        first = prog * BLK
        tp = prog * TT - 1  # the tile before this program's: its pages spill into our first blocks
        ep = (pid * NPROG + prog) * KSPAN * PPT
        tpv = tl.zeros([GP], tl.int32) + tp  # as a vector: masks from scalars alone fail to interpret
        tpok = gmask & (tpv >= 0) & (tpv < n_tiles)
        mt = tl.load(pms_ptr + rows * MAXT + tpv, mask=tpok, other=NEG)
        fe = tl.exp(mt - mx) * inv
        for k in tl.static_range(1, KSPAN):
            sv = tl.load(psc_ptr + ((rows[:, None] * MAXT + tpv[:, None]) * KSPAN + k) * PPT + pg[None, :],
                         mask=tpok[:, None], other=0.0)
            tl.store(edge_ptr + ep + k * PPT + pg, tl.sum(sv * fe[:, None], 0))
        tl.debug_barrier()  # this CTA's part and edge stores before its own loads below
        j = first + tl.arange(0, BLK)
        visible = j <= cur
        score = tl.zeros([BLK], tl.float32)
        for k in tl.static_range(KSPAN):
            x = j - k  # the page whose row k spills into block j
            own = tl.load(part_ptr + (pid * KSPAN + k) * SROW + x, mask=visible & (x >= first),
                          other=0.0, cache_modifier=".cg")
            if k > 0:
                own += tl.load(edge_ptr + ep + k * PPT + (x - first + PPT),
                               mask=visible & (x < first) & (x >= 0), other=0.0, cache_modifier=".cg")
            score += own
        key = _topn_keys(score, j, cur, NUM_INIT, NUM_LOCAL)
        ks = tl.arange(0, NSP)
        if HAS_TOPK:
            top = tl.topk(key, NSP)
        else:
            top = tl.max(tl.reshape(tl.sort(key, descending=True), [BLK // NSP, NSP]), 0)
        tl.store(cand_ptr + (pid * NPROG + prog) * NSP + ks, top)
    # The barrier orders this CTA's stores before the atomic's release; the acquire orders the last
    # program's loads after every other program's stores.
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid, 1)
    if arrived == NPROG - 1:
        tl.store(cnt_ptr + pid, 0)  # ready for the next call: every program of this group has counted
        if KFLAG:  # every program of the group is past its wait for the pass's count
            tl.store(kcnt_ptr + pid, 0)
        if TOPN == 2:
            c = tl.arange(0, NPROG_P * NSP)
            keys = tl.load(cand_ptr + pid * NPROG * NSP + c, mask=c < NPROG * NSP, other=-1,
                           cache_modifier=".cg")  # other CTAs' stores
            if HAS_TOPK:
                top = tl.topk(keys, NSP)
            else:
                top = tl.max(tl.reshape(tl.sort(keys, descending=True), [NPROG_P, NSP]), 0)
            _store_units(_blocks_of(top, NSEL, NSP), bt_ptr, sel_ptr + pid * NSEL, ulp_ptr + pid * NSP,
                         uph_ptr + pid * NSP, b, sbt_b, NSEL, NSP)
        else:
            j = tl.arange(0, NBP)
            visible = j <= cur
            score = tl.zeros([NBP], tl.float32)
            for k in tl.static_range(KSPAN):
                score += tl.load(part_ptr + (pid * KSPAN + k) * SROW + j - k, mask=visible & (j >= k),
                                 other=0.0, cache_modifier=".cg")  # other CTAs' stores
            _select_units(score, bt_ptr, sel_ptr + pid * NSEL, ulp_ptr + pid * NSP, uph_ptr + pid * NSP,
                          L, b, sbt_b, NBP, NSEL, NSP, NUM_INIT, NUM_LOCAL, PAGE, TOPN)
    if KFLAG and PDL:
        # This grid ends after the pass's (its values included): the attention kernel's wait for
        # this grid then covers the pass's partial outputs, which its merge reads.
        tl.extra.cuda.gdc_wait()


@triton.jit
def _wait_count(ptr, n):
    """Spin until the int32 counter at ptr reaches n (acquire: the counted programs' stores are
    visible after). Only for programs whose counters are bumped by already-running programs."""
    c = tl.atomic_add(ptr, 0, sem="acquire")
    while c < n:
        c = tl.atomic_add(ptr, 0, sem="acquire")


@triton.jit
def _select_units(score, bt_ptr, sel_ptr, ulp_ptr, uph_ptr, L, b, sbt_b,
                  NBP: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr, NUM_INIT: tl.constexpr,
                  NUM_LOCAL: tl.constexpr, PAGE: tl.constexpr, TOPN: tl.constexpr):
    """Forced blocks + top-n of one group (score [NBP]: its block scores), then its work list.

    Top-n key = (float bits of score) << 32 | (2³¹ − 1 − j): scores are ≥ 0 so their bits order like
    the floats; +inf's bits for forced blocks (the first NUM_INIT and the NUM_LOCAL most recent, the
    current one included); −1 for blocks past the current one. Keys are distinct, so the n largest
    in descending order are the best blocks, ties going to the lower block index (the reference's
    stable descending sort). TOPN picks how they are found (TOPN_MODES):
      0 "passes": n dependent passes of a block-wide int64 max, each removing its winner;
      1 "sort": Triton's bitonic top-k (`tl.topk`; a full `tl.sort` where the Triton lacks it):
        about (log n)² / 2 + log(NBP / n) · log n compare-and-swap steps, none waiting on a
        block-wide reduction's result to start the next;
      (2 "cand" does not come here: `_score_kernel` takes a top-n per program, then of those.)

    Work list [NSP]: the selected logical pages (−1 = none: fewer than n blocks exist) and their
    physical pages (an unused slot names table entry 0, always a valid page id)."""
    cur = (L - 1) // PAGE
    j = tl.arange(0, NBP)
    sel = _topn_blocks(_topn_keys(score, j, cur, NUM_INIT, NUM_LOCAL), j, NBP, NSEL, NSP, TOPN)
    _store_units(sel, bt_ptr, sel_ptr, ulp_ptr, uph_ptr, b, sbt_b, NSEL, NSP)


@triton.jit
def _topn_blocks(key, j, NBP: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr, TOPN: tl.constexpr):
    """The blocks of the NSEL best keys [NBP] of blocks j, best first, −1 past NSEL ([NSP]), found
    as TOPN says (`_select_units`: 0 passes, 1 sort)."""
    ks = tl.arange(0, NSP)
    if TOPN == 0:
        sel = tl.full([NSP], -1, tl.int32)
        for t in range(NSEL):
            kmax = tl.max(key, 0)
            idx = topn_block(kmax)
            sel = tl.where(ks == t, idx, sel)
            key = tl.where(j == idx, -1, key)
    else:
        if HAS_TOPK:
            top = tl.topk(key, NSP)
        else:  # sorted descending: row 0 of [NBP / NSP, NSP] is the largest NSP, so the column max
            top = tl.max(tl.reshape(tl.sort(key, descending=True), [NBP // NSP, NSP]), 0)
        sel = _blocks_of(top, NSEL, NSP)
    return sel


@triton.jit
def _topn_keys(score, j, cur, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr):
    """Top-n keys of blocks j (see `_select_units`): score bits, +inf for forced blocks, the block
    index in the low half (ties to the lower index), −1 past the current block."""
    visible = j <= cur
    forced = ((j < NUM_INIT) | (j > cur - NUM_LOCAL)) & visible
    return topn_key(score, j, forced, visible)


@triton.jit
def _blocks_of(top, NSEL: tl.constexpr, NSP: tl.constexpr):
    """Block indices of the NSP best keys in descending order (−1: no block, or past n)."""
    ks = tl.arange(0, NSP)
    return tl.where(ks < NSEL, topn_block(top), -1)


@triton.jit
def _store_units(sel, bt_ptr, sel_ptr, ulp_ptr, uph_ptr, b, sbt_b, NSEL: tl.constexpr, NSP: tl.constexpr):
    """The selection and the work list: logical pages and their physical pages."""
    ks = tl.arange(0, NSP)
    tl.store(sel_ptr + ks, sel, mask=ks < NSEL)
    phys = tl.load(bt_ptr + b * sbt_b + tl.maximum(sel, 0))
    tl.store(ulp_ptr + ks, sel)
    tl.store(uph_ptr + ks, phys)


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, rows, gmask, NS: tl.constexpr, GP: tl.constexpr,
                  SCH: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """Merge the NS split partial states (m, l, acc) of each row into a normalised [GP, DVP] output,
    SCH splits per step ([GP, SCH, DVP] loads issued at once: with few splits, one step). Unrolled
    (NS is a constant), so the three merges of the fused path are straight-line code whose loads
    need not wait for the previous merge's math (batch 16 at 64k: 98.1 → 96.9 µs). SCH 1: one
    split a step as [GP] and [GP, DVP] loads, no sum over a split axis (the default after Triton
    3.6: later releases compile that sum into many more barriers and shuffles, MERGE_CHUNK)."""
    s = tl.arange(0, SCH)
    dv = tl.arange(0, DVP)
    mx = tl.full([GP], NEG, tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    if SCH == 1:  # one split a step as [GP] and [GP, DVP] loads: no reduction across a split axis
        dmask = gmask[:, None] & (dv[None, :] < DV)
        for c in tl.static_range(NS):
            off = rows * NS + c
            ms = tl.load(m_ptr + off, mask=gmask, other=NEG, cache_modifier=".cg")
            ls = tl.load(l_ptr + off, mask=gmask, other=0.0, cache_modifier=".cg")
            a = tl.load(acc_ptr + off[:, None] * DV + dv[None, :], mask=dmask, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            mn = tl.maximum(mx, ms)
            al = tl.exp(mx - mn)
            w = tl.exp(ms - mn)
            total = total * al + ls * w
            acc = acc * al[:, None] + a * w[:, None]
            mx = mn
        return acc / tl.where(total > 0, total, 1.0)[:, None]
    for c in tl.static_range(0, NS, SCH):
        smask = gmask[:, None] & (c + s[None, :] < NS)
        off = rows[:, None] * NS + c + s[None, :]
        ms = tl.load(m_ptr + off, mask=smask, other=NEG, cache_modifier=".cg")
        ls = tl.load(l_ptr + off, mask=smask, other=0.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + off[:, :, None] * DV + dv[None, None, :],
                    mask=smask[:, :, None] & (dv[None, None, :] < DV), other=0.0,
                    cache_modifier=".cg").to(tl.float32)  # stored as fp32 or bf16
        mn = tl.maximum(mx, tl.max(ms, 1))
        al = tl.exp(mx - mn)
        w = tl.exp(ms - mn[:, None])
        total = total * al + tl.sum(ls * w, 1)
        acc = acc * al[:, None] + tl.sum(a * w[:, :, None], 1)
        mx = mn
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _attend_pages(q0, q1, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r, kh, lp_all, ph_all, idx,
                  L, lo, both, scale, m_a, l_a, acc_a, m_b, l_b, acc_b, n_iter,
                  DK: tl.constexpr, DK0: tl.constexpr, DK1: tl.constexpr,
                  DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr, BOTH: tl.constexpr,
                  STAGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of the group's query heads over page slots 0 … n_iter − 1 (a run-time
    count): page i is logical page lp_all[i] (−1: none) at physical page ph_all[i]. State a takes
    the tokens in [lo, L). With BOTH, state b also takes every token < L of the pages where `both`
    (shared K/V: a forced selected page that is in the window is read once and feeds both
    branches). The page lists are vectors read before the loop: addresses loaded inside it would
    cost the software pipeliner a stage (one buffer)."""
    r_tok = tl.arange(0, PAGE)
    d0 = tl.arange(0, DK0)
    dv = tl.arange(0, DVP)
    for i in tl.range(0, n_iter, num_stages=STAGES):
        lp = tl.sum(tl.where(idx == i, lp_all, 0))
        phys = tl.sum(tl.where(idx == i, ph_all, 0)).to(tl.int64)
        # No page gets positions ≥ L, so one comparison masks it (the CPU interpreter turns
        # (vector & scalar-bool) into int32 data, which its masked loads reject).
        pos = tl.where(lp >= 0, lp * PAGE, L) + r_tok
        tmask = pos < L
        kbase = k_ptr + phys * sk_p + kh * sk_h + r_tok[:, None] * sk_r
        kk = tl.load(kbase + d0[None, :], mask=tmask[:, None] & (d0[None, :] < DK), other=0.0)
        vv = tl.load(v_ptr + phys * sv_p + kh * sv_h + r_tok[:, None] * sv_r + dv[None, :],
                     mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
        s = _dot(q0, tl.trans(kk), PREC, UPCAST)  # [GP, PAGE]
        if DK1 > 0:
            d1 = DK0 + tl.arange(0, DK1)
            kk1 = tl.load(kbase + d1[None, :], mask=tmask[:, None] & (d1[None, :] < DK), other=0.0)
            s += _dot(q1, tl.trans(kk1), PREC, UPCAST)
        s = s * scale
        sa = tl.where((tmask & (pos >= lo))[None, :], s, float("-inf"))
        m_a, l_a, acc_a, _ = _online_softmax_step(m_a, l_a, acc_a, sa, vv, PREC, UPCAST)
        if BOTH:
            fb = tl.sum(tl.where(idx == i, both.to(tl.int32), 0))
            sb = tl.where((tmask & (r_tok * 0 + fb > 0))[None, :], s, float("-inf"))
            m_b, l_b, acc_b, _ = _online_softmax_step(m_b, l_b, acc_b, sb, vv, PREC, UPCAST)
    return m_a, l_a, acc_a, m_b, l_b, acc_b


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, o, gmask, m, l, acc, DV: tl.constexpr, DVP: tl.constexpr):
    dv = tl.arange(0, DVP)
    tl.store(m_ptr + o, m, mask=gmask)
    tl.store(l_ptr + o, l, mask=gmask)
    tl.store(acc_ptr + o[:, None] * DV + dv[None, :], acc.to(acc_ptr.dtype.element_ty),
             mask=gmask[:, None] & (dv[None, :] < DV))


@triton.jit
def _attend_kernel(q_ptr, sq_b, sq_h, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                   lens_ptr, bt_ptr, sbt_b, wt_ptr, swt_b, ulp_ptr, uph_ptr,
                   sm_ptr, sl_ptr, sacc_ptr, wm_ptr, wl_ptr, wacc_ptr,
                   pm_ptr, pl_ptr, pacc_ptr, gates_ptr, sg_b, sg_h, out_ptr, so_b, so_h, cnt_ptr,
                   scale, Hkv, NSPLIT_C: tl.constexpr,
                   G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DK0: tl.constexpr,
                   DK1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr,
                   NSEL: tl.constexpr, NSP: tl.constexpr, SPS_P: tl.constexpr,
                   WINDOW: tl.constexpr, WPS_P: tl.constexpr,
                   RING: tl.constexpr, RING_PAGES: tl.constexpr, DEDUP: tl.constexpr,
                   NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, NSPLIT: tl.constexpr,
                   STAGES: tl.constexpr, FUSE: tl.constexpr,
                   C_CH: tl.constexpr, S_CH: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (group, split): its share (at most WPS_P slots) of the sequence's window pages
    (first window page … current), then its share (at most SPS_P) of the selected pages left to
    read from the work list the score kernel's last-arriving program wrote. Shares are even, the
    remainder going to the last splits: launched last, they start up to ~10 µs later at batch 16
    (docs/benchmarks/decode.md, nineteenth round). Every branch is its own softmax, as in the
    reference.

    The window needs nothing from the score kernel (its pages follow from the length), so it
    comes first, before the wait for that kernel: launched early (programmatic dependent launch),
    the window's loads overlap the score kernel's top-n. With shared K/V (DEDUP) the forced
    blocks inside the window — always selected — are read once, in the window loop, and feed
    both branches; the selected loop skips them. FUSE 1: the group's last-arriving split also
    merges all partial states of the three branches and writes the gated output (no combine
    launch)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    Hq = Hkv * G
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kh * G + g
    rows = b * Hq + heads
    # Before the wait: this launch's inputs from kernels before the score kernel (q, the length,
    # the caches and tables) are complete — the score kernel waits for the compressed pass, which
    # waited for them, before it lets this kernel launch.
    L = tl.load(lens_ptr + b)
    q0, q1 = _load_q_halves(q_ptr, b * sq_b + heads * sq_h, gmask, DK, DK0, DK1)
    cur = (L - 1) // PAGE
    win_lo = tl.maximum(L - WINDOW, 0)
    first_wp = win_lo // PAGE
    m_s = tl.full([GP], NEG, tl.float32)
    l_s = tl.zeros([GP], tl.float32)
    a_s = tl.zeros([GP, DVP], tl.float32)
    m_w = tl.full([GP], NEG, tl.float32)
    l_w = tl.zeros([GP], tl.float32)
    a_w = tl.zeros([GP, DVP], tl.float32)
    # This split's share of the sequence's own window pages (not of the widest window, NWP): the
    # loop runs over its pages only (a run-time trip count), with no empty slots.
    wv = tl.arange(0, WPS_P)
    nw = cur - first_wp + 1
    w_lo = split * nw // NSPLIT
    n_win = (split + 1) * nw // NSPLIT - w_lo
    wok = wv < n_win
    wlp = tl.where(wok, first_wp + w_lo + wv, -1)
    wlp0 = tl.where(wok, wlp, 0)  # an unused slot reads table entry 0 (always a valid page id)
    if RING:
        wph = tl.load(wt_ptr + b * swt_b + wlp0 % RING_PAGES)
    else:
        wph = tl.load(bt_ptr + b * sbt_b + wlp0)
    forced = ((wlp < NUM_INIT) | (wlp > cur - NUM_LOCAL)) & wok
    m_w, l_w, a_w, m_s, l_s, a_s = _attend_pages(
        q0, q1, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r, kh, wlp, wph, wv, L, win_lo, forced,
        scale, m_w, l_w, a_w, m_s, l_s, a_s, n_win, DK, DK0, DK1, DV, DVP, PAGE, DEDUP, STAGES, PREC,
        UPCAST)
    if PDL:  # the work list is the score kernel's output
        tl.extra.cuda.gdc_wait()
    # The selected pages left to read — not −1 (fewer than n blocks), not read in the window loop
    # (DEDUP) — shared evenly by the splits, the remainder going to the last ones (launched last,
    # they start later), each split's taken from the whole work list by rank: no empty slots.
    sv = tl.arange(0, SPS_P)
    e = tl.arange(0, NSP)
    lp_all = tl.load(ulp_ptr + pid * NSP + e)
    ph_all = tl.load(uph_ptr + pid * NSP + e)
    todo = (e < NSEL) & (lp_all >= 0)
    if DEDUP:
        todo = todo & ~((lp_all >= first_wp) & ((lp_all < NUM_INIT) | (lp_all > cur - NUM_LOCAL)))
    rank = tl.cumsum(todo.to(tl.int32), 0) - 1
    n_todo = tl.sum(todo.to(tl.int32))
    base = n_todo // NSPLIT
    extra = n_todo - base * NSPLIT
    s_lo = split * base + tl.maximum(split - (NSPLIT - extra), 0)
    n_sel = base + (split >= NSPLIT - extra).to(tl.int32)
    pick = todo[None, :] & (rank[None, :] == (s_lo + sv)[:, None])  # [SPS_P, NSP]: one entry a slot
    sok = sv < n_sel
    slp = tl.where(sok, tl.sum(tl.where(pick, lp_all[None, :], 0), 1), -1)
    sph = tl.sum(tl.where(pick, ph_all[None, :], 0), 1)
    m_s, l_s, a_s, m_w, l_w, a_w = _attend_pages(
        q0, q1, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r, kh, slp, sph, sv, L, 0, sok,
        scale, m_s, l_s, a_s, m_w, l_w, a_w, n_sel, DK, DK0, DK1, DV, DVP, PAGE, False, STAGES, PREC,
        UPCAST)
    if PDL:  # the combine kernel (small batch) or the next layer's kernels may be launched now
        tl.extra.cuda.gdc_launch_dependents()
    o = rows * NSPLIT + split
    _store_partial(sm_ptr, sl_ptr, sacc_ptr, o, gmask, m_s, l_s, a_s, DV, DVP)
    _store_partial(wm_ptr, wl_ptr, wacc_ptr, o, gmask, m_w, l_w, a_w, DV, DVP)
    if FUSE == 1:
        # Last-arriving split of the group: every split's partials are written (the barrier orders
        # this CTA's stores before the release of the atomic; its acquire orders the loads after).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)
        if arrived == NSPLIT - 1:
            tl.store(cnt_ptr + pid, 0)  # ready for the next call (every split has counted)
            _merge_and_gate(pm_ptr, pl_ptr, pacc_ptr, sm_ptr, sl_ptr, sacc_ptr, wm_ptr, wl_ptr, wacc_ptr,
                            gates_ptr, sg_b, sg_h, out_ptr, so_b, so_h, b, heads, rows, gmask,
                            NSPLIT_C, NSPLIT, GP, C_CH, S_CH, DV, DVP)


@triton.jit
def _tile_values(vc_ptr, svc_p, svc_h, svc_e, bt_ptr, sbt_b, pms_ptr, pp_ptr, b, kh, rows, gmask,
                 n_cmp, t_lo, t_hi, m, MAXT, GP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                 E: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Σ over compressed tiles t in [t_lo, t_hi) of exp(m_t − m) · (p_t · V_t) → [GP, DVP], the
    compressed-pass program's output relative to its final max m: p_t = exp(s − m_t) as its key
    loop stored it (pp), m_t its running max then (pms), V_t the tile's value summaries read
    through the block table."""
    dv = tl.arange(0, DVP)
    acc = tl.zeros([GP, DVP], tl.float32)
    # Page ids one tile ahead, as in the compressed pass (addresses from a load in the same
    # iteration would cost the pipeliner a stage).
    i_n = t_lo * BN + tl.arange(0, BN)
    page_n = tl.load(bt_ptr + b * sbt_b + i_n // E, mask=i_n < n_cmp, other=0)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        i = t * BN + tl.arange(0, BN)
        valid = i < n_cmp
        page = page_n.to(tl.int64)
        page_n = tl.load(bt_ptr + b * sbt_b + (i + BN) // E, mask=i + BN < n_cmp, other=0)
        v = tl.load(vc_ptr + page[:, None] * svc_p + kh * svc_h + (i % E)[:, None] * svc_e + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        pt = tl.load(pp_ptr + rows[:, None] * (MAXT * BN) + i[None, :], mask=gmask[:, None], other=0.0)
        mt = tl.load(pms_ptr + rows * MAXT + t, mask=gmask, other=NEG)
        acc += tl.exp(mt - m)[:, None] * _dot(pt, v, PREC, UPCAST)
    return acc


@triton.jit
def _merge_and_gate(pm_ptr, pl_ptr, pacc_ptr, sm_ptr, sl_ptr, sacc_ptr, wm_ptr, wl_ptr, wacc_ptr,
                    gates_ptr, sg_b, sg_h, out_ptr, so_b, so_h, b, heads, rows, gmask,
                    NSPLIT_C: tl.constexpr, NSPLIT: tl.constexpr, GP: tl.constexpr, C_CH: tl.constexpr,
                    S_CH: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """The gated output of the rows in gmask from every split's partial states of the three
    branches (compressed, selected, window)."""
    dv = tl.arange(0, DVP)
    o_c = _merge_splits(pm_ptr, pl_ptr, pacc_ptr, rows, gmask, NSPLIT_C, GP, C_CH, DV, DVP)
    o_s = _merge_splits(sm_ptr, sl_ptr, sacc_ptr, rows, gmask, NSPLIT, GP, S_CH, DV, DVP)
    o_w = _merge_splits(wm_ptr, wl_ptr, wacc_ptr, rows, gmask, NSPLIT, GP, S_CH, DV, DVP)
    gp = gates_ptr + b * sg_b + heads * sg_h
    g0 = tl.load(gp, mask=gmask, other=0.0).to(tl.float32)
    g1 = tl.load(gp + 1, mask=gmask, other=0.0).to(tl.float32)
    g2 = tl.load(gp + 2, mask=gmask, other=0.0).to(tl.float32)
    res = g0[:, None] * o_c + g1[:, None] * o_s + g2[:, None] * o_w
    tl.store(out_ptr + b * so_b + heads[:, None] * so_h + dv[None, :],
             res.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & (dv[None, :] < DV))


def _check_inputs(q, gates, layer, block_tables, seq_lens, p, win_tables):
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, Dk], got {tuple(q.shape)}")
    B, Hq, Dk = q.shape
    _, Hkv, P, Dk2 = layer.k_cache.shape
    if Dk2 != Dk or layer.kc_cache.shape[-1] != Dk:
        raise ValueError(f"q head dim {Dk} does not match the key caches ({Dk2}, {layer.kc_cache.shape[-1]})")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if gates is not None and tuple(gates.shape) != (B, Hq, 3):
        raise ValueError(f"gates must be [B, Hq, 3] = {(B, Hq, 3)}, got {tuple(gates.shape)}")
    if gates is not None:
        check_last_dim_contiguous("gates", gates)
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [B={B}, max_pages], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (B,):
        raise ValueError(f"seq_lens must be int32 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if p is not None:
        if P != p.select_block:
            raise ValueError(f"page size {P} must equal the selection block l' = {p.select_block}")
        if P % p.stride or layer.kc_cache.shape[2] != P // p.stride:
            raise ValueError(f"summary rows per page must be l'/d = {P // p.stride} (d must divide l')")
        if win_tables is not None:
            # The ring may be longer than w (chunked prefill keeps w + chunk tokens); it must hold w.
            if win_tables.dim() != 2 or win_tables.shape[0] != B or win_tables.shape[1] * P < p.window:
                raise ValueError(f"win_tables must be int32 [B, ≥ w/P = {math.ceil(p.window / P)}] pages, "
                                 f"got {tuple(win_tables.shape)}")
            if win_tables.dtype != torch.int32:
                raise ValueError("win_tables must be int32")
    for name, t in (("q", q), ("k_cache", layer.k_cache), ("v_cache", layer.v_cache),
                    ("kc_cache", layer.kc_cache), ("vc_cache", layer.vc_cache),
                    ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)


def _split_dk(dk: int) -> tuple[int, int]:
    """dk as two power-of-two dot widths (DK0, DK1): 192 → (128, 64), 128 → (128, 0), 24 → (16, 16).

    Padding 192 to 256 would waste a quarter of the key registers, shared memory and MMA work."""
    dk0 = max(16, 1 << (int(dk).bit_length() - 1))
    rest = dk - dk0
    return dk0, (max(16, next_pow2(rest)) if rest > 0 else 0)


def nsa_decode(q: torch.Tensor, gates: torch.Tensor, layer: PagedLayerCache, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, p: SparsityParams, win_tables: torch.Tensor | None = None,
               scale: float | None = None, return_selection: bool = False,
               num_splits: int | None = None, chunk: int | None = None, num_warps: int | None = None):
    """NSA attention for one new token per sequence. q [B, Hq, Dk], gates [B, Hq, 3] → [B, Hq, Dv].

    seq_lens[b] ≥ 1 counts the current token, whose K/V and every summary it completes are already
    in the cache. With `return_selection` also returns the selected blocks [B, Hkv, n] (int32, best
    first, −1 where fewer than n blocks exist). `num_splits` / `chunk` override the split-K sizing
    (tests use them to exercise many splits at small shapes; `chunk` = compressed entries per tile).
    `num_warps` is the selection/attention kernel's (default ATTEND_WARPS).
    """
    return nsa_decode_tuned(q, gates, layer, block_tables, seq_lens, p, win_tables, scale,
                            return_selection, num_splits, chunk, num_warps)


# Compressed-pass launch defaults, measured at 64k (docs/benchmarks/decode.md, second round):
# 4 warps beat 8 by 75 µs at batch 64 (2-3 programs per SM instead of 1), 3 stages beat 2 by 35.
# Since the page ids are loaded a tile ahead, 3 stages means two tile buffers (before: one, because
# the ids loaded in the same iteration took a stage), one program per SM (seventh round).
CMP_WARPS = 4
CMP_STAGES = 3
# Compressed entries per tile: 128 beat 64 on the H200 (batch 16: 126.8 → 119.1 µs, batch 64:
# 366.9 → 327.6 µs at 64k; batch 1 equal; 256 was slower everywhere), docs/benchmarks/decode.md.
CMP_TILE = 128
# Small batches (at most SMALL_GROUPS kv groups, i.e. batch ≤ 2 at 4 kv heads) are latency-bound:
# 32-entry tiles at two programs an SM (each program 2 tiles deep at batch 1) beat one 128-entry
# tile a program. H200, 64k, paper shape, graph µs, two runs (docs/benchmarks/decode.md,
# seventeenth round): batch 1 29.0 / 30.0 → 27.6 / 27.7, batch 2 35.0 → 33.6; batch 4 and 8 were
# slower with any smaller tile (44.6 → ≥ 45.9, 62.3 → ≥ 63.9).
SMALL_GROUPS = 8
SMALL_TILE = 32
# L2 eviction hints in the compressed pass: its summary reads (168 MB at batch 16, 64k, read once)
# evict first, its partial results (8 MB, read next by the score kernel) last, so the score
# kernel's loads find them in L2. H200, 64k, same call (docs/benchmarks/decode.md, fifteenth
# round): batch 16 92.5 / 92.3 → 91.0 / 90.9 µs; batch 1 29.3 → 29.4; batch 64 281.9 / 281.0 →
# 282.3 / 283.0 (its partials are 34 MB, most of the L2). Triton 3.6 (the GPU image's) keeps
# only the stores' hint: its pipelined (cp.async) loads drop eviction policies, so that gain is the
# partials'. Triton 3.9 puts both in the PTX (twentieth round). Triton 3.6 drops them on purpose: its
# bundled ptxas 12.8 miscompiles hinted cp.async (an illegal-instruction fault). Put back with
# ptxas 13.4 (scripts/cp_async_hint_probe.py, twenty-first round), the read hint alone gave batch
# 1 / 16 / 64 −0.4 / −0.3 / +3.9–4.8 µs; with the attention kernel's page reads hinted too, batch
# 16 went 90.6 → 87.2 µs. Revisit both hints on a toolchain that emits them (Triton ≥ 3.9).
CMP_EVICT = True
# Selection/attention launch defaults. Padded to 256, dk = 192 needs 8 warps (4 take 252 registers
# for the [64, 256] key tiles); split as 128 + 64 dots, 4 warps fit and were fastest at 64k on the
# H100 (docs/benchmarks/decode.md, fourth round: batch 16 166.6 → 143.5 µs, batch 64 434 → 425 µs).
ATTEND_WARPS = 4
ATTEND_SPLIT_DK = True
# How the score kernel finds the top-n (`_select_units`). "sort" measured on the H200 at 64k
# (docs/benchmarks/decode.md, ninth round): batch 1 31.2 → 29.9 µs, batch 16 97.7 → 96.7, batch 64
# equal; its top-n program 6.1 → 4.8 µs at batch 1 (timeline). "cand" over "sort" (ninth session,
# same call): batch 1 29.4 → 29.3 µs, batch 16 97.5 → 96.8, batch 64 equal; in the timeline the
# score kernel's last program ends 1.0 µs (batch 1) and 4.1 µs (batch 16) earlier, the step 0.7 µs.
TOPN_MODES = ("passes", "sort", "cand")
TOPN_DEFAULT = "cand"
HAS_TOPK = tl.constexpr(hasattr(tl, "topk"))  # tl.topk arrived after tl.sort (Triton 3.x)

# Preferred shared-memory carveout (percent) of the small score and combine kernels. Left to the
# driver, SMs that hold score programs took attention programs (90 KB of buffers) only once they
# drained. Measured on the H200 at 64k (ninth-round code, tenth session): batch 16 95.9 → 92.3 µs,
# the first attention program entering at 59.1 instead of 64.8 µs; batch 1 equal (29.5 / 29.3).
# Carveout 0 (prefer L1) was slower: 99.6 µs, the score programs entering at 64 instead of 58.
CARVEOUT_DEFAULT = 100

# The splits' partial output rows (unnormalised sums; m and l stay fp32) in bf16 for bf16 inputs, as
# vLLM's split-K decode keeps its partial outputs in the activation dtype: the merges read half the
# bytes, one more bf16 rounding of each row (max |Δ| 2e-3 at 64k; the bf16 tests' 1e-2 bound holds).
# fp16 inputs keep fp32 rows: fp16's range is too small for unnormalised sums. H200, 64k, paper
# shape, graph µs, fp32 → bf16 rows in one process each (docs/benchmarks/decode.md, twenty-second
# round): batch 16 89.9 → 89.6, 89.9 → 89.0, 88.9 → 89.0, 89.8 → 89.0, 89.6 → 88.3; batch 64
# 280.7 → 279.6, 277.3 → 275.5, 277.4 → 275.6; batch 1 27.1 → 27.4. Timeline at batch 16: the fused
# merge 2.05 → 1.54 µs.
BF16_PARTIALS = True

# Values after keys (`_values_after_keys`): from batch 3 (more than SMALL_GROUPS kv groups) with PDL,
# each compressed-pass program reads its tiles' value summaries after its keys, and the score
# programs wait for their group's key splits only, so the score sums and top-n overlap the value
# reads. Its launch shape: the
# pass's 104 KB of buffers fit two programs an SM, and one-warp score programs (all 512 at batch
# 16) fit beside them. H200, 64k, paper shape, graph µs (docs/benchmarks/decode.md, twenty-sixth
# round): batch 16 88.2 → 84.0 (one-warp score) / 84.7 (two), batch 64 275.3 → 267.5 / 268.4,
# batch 1 26.8 → 30.4 / 30.2 (not used there). With four-warp score programs batch 16 was 90.4 (they
# entered late, beside the pass); values read by the attention splits instead were slower at every
# batch (89.4–108.4 at 16).
VALUES_AFTER_KEYS_SCORE_WARPS = 1

# Fuse the split merge and gates into the attention kernel's last split when both branches have at
# most FUSE_MAX_SPLITS splits (at 64k on 132 SMs: batch ≥ 8 with 8, ≥ 16 with 4); many splits
# (batch 1) would serialise that merge. MERGE_CHUNK: splits the fused merge takes a step
# (`_merge_splits`). Both depend on the Triton release: the merge's [GP, k, DVP] sums over k compile
# worse after 3.6 (sm_90 SASS, batch 16: Triton 3.7.1 spills 264 B in the attention kernel, 3.8 and
# 3.9 add ≈ 110 barriers and ≈ 420–450 shuffles), while one split a step ([GP] and [GP, DVP] loads, no
# split-axis sums) builds without them on 3.6–3.9 (3.9: a 24 B spill). H100, 64k, paper shape,
# graph µs, batch 8 / 16 / 64 (docs/benchmarks/decode.md, thirty-sixth round): Triton 3.6, four a
# step 66.4 / 105.2 / 363.0, one 70.3 / 106.3 / 363.4; Triton 3.9, four a step 95.1 / 114.1 / 364.3,
# one 69.8 / 105.8 / 363.1, and the combine launch instead 66.5 / 106.7 / 368.4 (so 3.9 fuses only
# up to 4 splits: batch 8 has 8). 3.7 and 3.8 take 3.9's rule from their SASS alone (not timed).
LATER_TRITON = triton_release() > (3, 6)
FUSE_MAX_SPLITS = 4 if LATER_TRITON else 8
MERGE_CHUNK = 1 if LATER_TRITON else 4


def nsa_decode_tuned(q, gates, layer, block_tables, seq_lens, p, win_tables=None, scale=None,
                     return_selection=False, num_splits=None, chunk=None, num_warps=None,
                     cmp_warps=None, cmp_stages=None, cmp_programs=None, cmp_split_dk=True,
                     attend_split_dk=None, attend_stages=3, fuse_combine=None, pdl=None,
                     score_warps=None, topn=TOPN_DEFAULT, carveout=CARVEOUT_DEFAULT,
                     cmp_evict=None, bf16_partials=None, values_after_keys=None, merge_chunk=None):
    """`nsa_decode` with launch knobs exposed (for the benchmark's sweep; results do not depend on
    them beyond float rounding). `*_split_dk`: dk as DK0 + DK1 power-of-two dots, else padded to
    the next power of two. `fuse_combine`: merge the splits in the attention kernel's last split
    (None: when both branches have at most FUSE_MAX_SPLITS splits). `pdl`: programmatic dependent
    launch (None: `pdl_enabled`). `topn`: how the top-n is found (TOPN_MODES, `_select_units`).
    `carveout`: preferred shared-memory carveout, percent, of the small score and combine kernels
    (`set_carveout`; None: the driver's choice). `bf16_partials`: the splits' partial output
    rows (not their m and l) stored in bf16 when q is bf16 (None: BF16_PARTIALS).
    `values_after_keys`: the compressed pass reads values after keys and the score kernel waits
    for the keys only (None: `_values_after_keys`); it also sets the default pass programs (two an
    SM) and score warps (VALUES_AFTER_KEYS_SCORE_WARPS; else 4). `merge_chunk`: splits the fused
    merge takes a step (None: MERGE_CHUNK, by Triton release).
    Defaults: the fastest measured at 64k (docs/benchmarks/decode.md).

    With PDL each kernel waits (griddepcontrol.wait) before touching memory, so it is safe after
    any kernel. (With values after keys the score programs instead wait for their group's count of
    the pass's key splits: they launch only once every pass program has counted itself, i.e. after
    the pass's own wait, and they wait for the pass's grid at their end, so the attention kernel's
    wait still covers everything before it.) A kernel lets its dependents launch (launch_dependents) once its own main work is
    issued: they are launched only when every one of its programs has said so, so waiting programs
    of the next kernel never hold SM slots that this kernel's unscheduled programs need."""
    _check_inputs(q, gates, layer, block_tables, seq_lens, p, win_tables)
    B, Hq, Dk = q.shape
    _, Hkv, P, _ = layer.k_cache.shape
    Dv = layer.v_cache.shape[-1]
    G = Hq // Hkv
    E = P // p.stride
    NG = B * Hkv
    max_pages = block_tables.shape[1]
    max_cmp = max(0, (max_pages * P - p.block) // p.stride + 1)
    dev = q.device
    pdl = pdl_enabled(dev) if pdl is None else bool(pdl)
    after_keys = _values_after_keys(NG, pdl) if values_after_keys is None else bool(values_after_keys)
    score_warps = score_warps or (VALUES_AFTER_KEYS_SCORE_WARPS if after_keys else 4)
    if chunk is None:
        chunk, cmp_programs = _cmp_tiling(NG, E, cmp_programs, q.device)
    if chunk % E or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk ({chunk}) must be a power of two ≥ 16 and a multiple of l'/d = {E}")
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    f32 = torch.float32
    cmp_warps = cmp_warps or CMP_WARPS
    cmp_stages = cmp_stages or CMP_STAGES
    num_warps = num_warps or ATTEND_WARPS
    attend_split_dk = ATTEND_SPLIT_DK if attend_split_dk is None else attend_split_dk
    evict = CMP_EVICT if cmp_evict is None else bool(cmp_evict)
    read_ev, keep_ev = ("evict_first", "evict_last") if evict else ("", "")
    launch = {"launch_pdl": True} if pdl else {}  # only passed when on: older Triton lacks the option

    # Launch 1 sizing: tiles of BN entries (whole pages); KSPAN = blocks one entry can touch.
    BN = chunk
    KSPAN = ((E - 1) * p.stride + p.block - 1) // P + 1
    MAXT = max(1, triton.cdiv(max_cmp, BN))
    GP = max(16, next_pow2(G))
    DK0, DK1 = _split_dk(Dk) if cmp_split_dk else (max(16, next_pow2(Dk)), 0)
    ADK0, ADK1 = _split_dk(Dk) if attend_split_dk else (max(16, next_pow2(Dk)), 0)
    DVP = next_pow2(Dv)
    prec = dot_precision(q.dtype)
    ring = win_tables is not None
    wt = win_tables if ring else block_tables
    # Work of launch 3: the window's pages (at most NWP) and the n selected pages.
    NWP = (p.window - 1 + P - 1) // P + 1
    NSP = max(2, next_pow2(p.num_select))
    NBP = max(16, NSP, next_pow2(max_pages))  # ≥ NSP: the sorting top-n takes NSP of NBP keys

    # Pipeline stages: the pipeliner keeps stages − 1 buffers of a tile (the page ids are loaded
    # one tile ahead); fp32 tiles are twice as large, so they may get fewer.
    elem = q.element_size()
    budget = pipeline_smem_budget(dev)
    cmp_stages = _stages_that_fit(cmp_stages, BN * (DK0 + DK1 + DVP) * elem, budget)
    attend_stages = _stages_that_fit(attend_stages, P * (ADK0 + ADK1 + DVP) * elem, budget)
    # Splits: one program per SM (two 80 KB tile buffers each; measured on the H200, batch 16:
    # 104.5 µs vs 109.3 with two programs per SM, i.e. two waves), as many as fit in one wave (a
    # second, partial wave would double the time of the slowest group); no more than the widest
    # sequence has tiles. Each sequence's tiles are shared among them in the kernel.
    # (Values after keys: the keys-only buffers fit two programs an SM, so two.)
    want = cmp_programs or (target_programs(dev) if after_keys else max(1, target_programs(dev) // 2))
    nsplit_c = max(1, min(MAXT, want // NG))
    nsplit_c = triton.cdiv(MAXT, triton.cdiv(MAXT, nsplit_c))
    pm = torch.empty(B, Hq, nsplit_c, device=dev, dtype=f32)
    pl = torch.empty_like(pm)
    bf16_partials = BF16_PARTIALS if bf16_partials is None else bool(bf16_partials)
    part_dt = torch.bfloat16 if bf16_partials and q.dtype == torch.bfloat16 else f32
    pacc = torch.empty(B, Hq, nsplit_c, Dv, device=dev, dtype=part_dt)
    # Values after keys: the key loop's p per entry, read back by the same program.
    pp = torch.empty(B * Hq, MAXT * BN, device=dev, dtype=q.dtype) if after_keys else pm
    pms = torch.empty(B, Hq, MAXT, device=dev, dtype=f32)
    if topn not in TOPN_MODES:
        raise ValueError(f"topn must be one of {TOPN_MODES}, got {topn!r}")
    PPT = BN // E
    psc = torch.empty(B, Hq, MAXT, KSPAN, PPT, device=dev, dtype=f32)
    sel = torch.empty(B, Hkv, p.num_select, device=dev, dtype=torch.int32)
    ulp = torch.empty(NG, NSP, device=dev, dtype=torch.int32)
    uph = torch.empty_like(ulp)
    cnt = _arrival_counters(dev, 3 * NG)  # attention arrivals, score arrivals, pass key splits done
    kcnt = cnt[2 * NG:]
    kc, vc = layer.kc_cache, layer.vc_cache
    _cmp_tile_kernel[(NG, nsplit_c)](
        q, q.stride(0), q.stride(1), kc, kc.stride(0), kc.stride(1), kc.stride(2),
        vc, vc.stride(0), vc.stride(1), vc.stride(2), block_tables, block_tables.stride(0), seq_lens,
        pm, pl, pacc, pms, psc, pp, kcnt, scale, Hkv, MAXT, nsplit_c,
        G=G, GP=GP, DK=Dk, DK0=DK0, DK1=DK1, DV=Dv, DVP=DVP, BLOCK_L=p.block, STRIDE=p.stride, PAGE=P,
        E=E, BN=BN, PPT=PPT, KSPAN=KSPAN, STAGES=cmp_stages,
        PREC=prec, UPCAST=interpreter_upcast(q.dtype), READ_EV=read_ev, KEEP_EV=keep_ev,
        VAFTER=after_keys, PDL=pdl, num_warps=cmp_warps, **launch)
    # Launch 2 sizing: TT compressed tiles per program (about 4096 partial scores: 32 a thread).
    TT = 1 << ((max(1, 4096 // (GP * KSPAN * PPT))).bit_length() - 1)
    nprog = triton.cdiv(MAXT, TT)
    SROW = max(NBP, MAXT * PPT)
    part = torch.empty(NG, KSPAN, SROW, device=dev, dtype=f32)
    if topn == "cand" and (TT * PPT < NSP or KSPAN - 1 > PPT or nprog * TT * PPT < max_pages):
        # A program's blocks must hold n candidates, spills reach one tile back at most, and the
        # programs' blocks cover the table (not so when l − d ≥ l': the last page has no entry).
        topn = "sort"
    cands = topn == "cand"
    cand = torch.empty(NG, nprog, NSP, device=dev, dtype=torch.int64) if cands else pms
    edge = torch.empty(NG, nprog, KSPAN, PPT, device=dev, dtype=f32) if cands else pms
    k_score = _score_kernel[(NG, nprog)](
        seq_lens, pm, pl, pms, psc, part, block_tables, block_tables.stride(0),
        sel, ulp, uph, cnt[NG:], cand, edge, kcnt, Hkv, MAXT, nsplit_c, nprog, SROW,  # SROW: a stride, run-time
        G=G, GP=GP, BLOCK_L=p.block, STRIDE=p.stride, PAGE=P, BN=BN, PPT=PPT, KSPAN=KSPAN,
        NSPLIT_P=next_pow2(nsplit_c), TT=TT, NBP=NBP, NSEL=p.num_select, NSP=NSP,
        NUM_INIT=p.num_init, NUM_LOCAL=p.num_local, TOPN=TOPN_MODES.index(topn),
        NPROG_P=next_pow2(nprog) if cands else 1, KFLAG=after_keys,
        PDL=pdl, num_warps=score_warps, **launch)
    set_carveout(k_score, carveout)

    if num_splits is None:
        # Up to two programs per SM, one wave (they fit two per SM: 253 registers, 90 KB of
        # buffers). Measured on the H200 at 64k: batch 16 4 splits 106.0 µs vs 3: 109.3, 6: 117.2;
        # batch 64 1 split 289 vs 4: 309; batch 1 every page its own split.
        num_splits = target_programs(dev) // NG
    nsplit = max(1, min(num_splits, max(p.num_select, NWP)))
    # Slots a split may need (its share of at most n selected and NWP window pages).
    sps, wps = triton.cdiv(p.num_select, nsplit), triton.cdiv(NWP, nsplit)
    # Shared K/V: forced blocks inside the window are read once (window loop) for both branches;
    # every forced block is selected (SparsityParams keeps n ≥ num_init + num_local).
    dedup = not ring
    sm = torch.empty(B, Hq, nsplit, device=dev, dtype=f32)
    sl, wm, wl = torch.empty_like(sm), torch.empty_like(sm), torch.empty_like(sm)
    sacc = torch.empty(B, Hq, nsplit, Dv, device=dev, dtype=part_dt)
    wacc = torch.empty_like(sacc)
    out = torch.empty(B, Hq, Dv, device=dev, dtype=q.dtype)
    NC_P, NS_P = max(2, next_pow2(nsplit_c)), max(2, next_pow2(nsplit))
    if fuse_combine is None:
        fuse_combine = max(nsplit_c, nsplit) <= FUSE_MAX_SPLITS
    mchunk = MERGE_CHUNK if merge_chunk is None else int(merge_chunk)
    if mchunk < 1 or mchunk & (mchunk - 1):
        raise ValueError(f"merge_chunk must be a power of two ≥ 1, got {merge_chunk}")
    fuse_mode = int(bool(fuse_combine))
    k, v = layer.k_cache, layer.v_cache
    _attend_kernel[(NG, nsplit)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), seq_lens, block_tables, block_tables.stride(0),
        wt, wt.stride(0), ulp, uph, sm, sl, sacc, wm, wl, wacc,
        pm, pl, pacc, gates, gates.stride(0), gates.stride(1), out, out.stride(0), out.stride(1),
        cnt, scale, Hkv, nsplit_c if fuse_mode else 1,  # a constant only the fused merges use:
        # 1 otherwise, so unfused launches do not compile a variant per compressed split count
        G=G, GP=GP, DK=Dk, DK0=ADK0, DK1=ADK1, DV=Dv, DVP=DVP, PAGE=P, NSEL=p.num_select, NSP=NSP,
        SPS_P=max(2, next_pow2(sps)), WINDOW=p.window, WPS_P=max(2, next_pow2(wps)),
        RING=ring, RING_PAGES=win_tables.shape[1] if ring else 1,
        DEDUP=dedup, NUM_INIT=p.num_init, NUM_LOCAL=p.num_local, NSPLIT=nsplit, STAGES=attend_stages,
        FUSE=fuse_mode, C_CH=min(mchunk, NC_P), S_CH=min(mchunk, NS_P), PREC=prec,
        UPCAST=interpreter_upcast(q.dtype), PDL=pdl, num_warps=num_warps, num_stages=attend_stages,
        **launch)

    if not fuse_mode:
        k_comb = _combine_kernel[(B * Hq,)](
            out, out.stride(0), out.stride(1), gates, gates.stride(0), gates.stride(1),
            pm, pl, pacc, sm, sl, sacc, wm, wl, wacc, Hq, nsplit_c, nsplit, NSA=True,
            NC_P=NC_P, NS_P=NS_P, DV=Dv, DVP=DVP, PDL=pdl, num_warps=4, **launch)
        set_carveout(k_comb, carveout)
    if return_selection:
        return out, sel
    return out


def _cmp_tiling(groups: int, entries_per_page: int, programs: int | None, dev: torch.device):
    """Default compressed-pass tile (entries) and program count for `groups` = B·Hkv kv groups:
    small tiles, two programs an SM at small batch (SMALL_GROUPS), else CMP_TILE at one an SM
    (programs None: nsa_decode_tuned's default). A caller's `programs` keeps the large tile."""
    if groups <= SMALL_GROUPS and programs is None:
        return max(SMALL_TILE, entries_per_page), target_programs(dev)
    return max(CMP_TILE, entries_per_page), programs


def _values_after_keys(groups: int, pdl: bool) -> bool:
    """Default of `nsa_decode_tuned(values_after_keys=...)`: with PDL (the score kernel can only
    overlap the value reads when launched early) and more than SMALL_GROUPS kv groups. At batch 1
    it was slower in every launch shape tried (26.7–26.8 → 29.8–32.4 µs at 64k): the pass is
    latency-bound there."""
    return pdl and groups > SMALL_GROUPS


def _stages_that_fit(stages: int, stage_bytes: int, budget: int) -> int:
    """Fewer pipeline stages when stages − 1 tile buffers would not fit in `budget` bytes (≥ 2):
    e.g. two 80 KB compressed tiles fit an H100/H200 block, not an A100's (one buffer there)."""
    while stages > 2 and (stages - 1) * stage_bytes > budget:
        stages -= 1
    return stages


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-group arrival counters (int32, zero between calls: the last arriving program of each
    group resets its own). Kept per device so a call allocates nothing; grown (zeroed) on demand.
    Calls on one device must not overlap in time on different streams (the engine uses one)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        _COUNTERS[device] = buf
    return buf
