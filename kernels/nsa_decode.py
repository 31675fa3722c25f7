"""Triton NSA decode over the paged cache: one new token per sequence, four launches per layer.

Equals `paged.paged_nsa_attention_ref(q, gates, layer, block_tables, arange(B + 1), seq_lens, p,
win_tables, scale)` (tested on fresh random inputs; see docs/kernels_decode.md). Launches:

1. `_cmp_chunk_kernel`, grid (B·Hkv, splits): a program walks a run of chunks (CH compressed
   entries each) of one kv group, loads their summaries through the block table once for all G
   query heads, and writes (a) the compressed branch's partial softmax state for its run and
   (b) per chunk, partial selection scores Σ_i w_ij·exp(s_hi − m_h) for the blocks those entries
   overlap (`w` = the overlap weights of `reference.selection_weights`, built from indices and
   applied with one small fp32 matmul). Scores stay per head: they can only be summed over the
   group once each head's global softmax normaliser is known.
2. `_score_kernel`, grid (B·Hkv, block tiles): merges the per-head normalisers and sums the group's
   block scores (main part from the chunk holding the block, spill from the chunk before).
3. `_select_attend_kernel`, grid (B·Hkv, splits): every program forces the initial/local blocks,
   takes the top-n in registers (n argmax passes over packed (score bits, −index) int64 keys, so
   ties go to the lower block index, the reference's rule) and attends to its share of the work
   units: the n selected pages, then the window's pages. With shared K/V a page that is both
   selected and in the window is loaded once and feeds both branches' softmaxes (each branch is its
   own softmax, exactly as the reference computes them); window pages already selected are skipped,
   so every token is read once. With independent K/V (`win_tables`) the window reads its ring.
4. `_combine_kernel` (in _triton_utils), grid (B·Hq): merges the split-K partial states of the three
   branches and applies the gates.

Everything is sized from tensor shapes (never from tensor values), so there is no host sync and the
whole call can be captured in a CUDA graph (tested: capture, change q and seq_lens, replay).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import (NEG, _combine_kernel, _dot, check_last_dim_contiguous, dot_precision,
                            interpreter_upcast, next_pow2, target_programs)
from .paged import PagedLayerCache
from .reference import SparsityParams



@triton.jit
def _cmp_chunk_kernel(q_ptr, sq_b, sq_h, kc_ptr, skc_p, skc_h, skc_e, vc_ptr, svc_p, svc_h, svc_e,
                      bt_ptr, sbt_b, lens_ptr, pm_ptr, pl_ptr, pacc_ptr, pms_ptr, psc_ptr, scale, Hkv,
                      G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                      DV: tl.constexpr, DVP: tl.constexpr, BLOCK_L: tl.constexpr,
                      STRIDE: tl.constexpr, PAGE: tl.constexpr, E: tl.constexpr, CH: tl.constexpr,
                      BN: tl.constexpr, NBC: tl.constexpr, NBW: tl.constexpr, NSCORE: tl.constexpr,
                      MAXCH: tl.constexpr, CPS: tl.constexpr, NSPLIT: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (group, split) walks chunks [split·CPS, split·CPS + CPS) of CH entries each.

    One online-softmax state runs across its chunks (one partial per split, not per chunk, keeps
    the combine's traffic small); the block scores restart every chunk and are stored per chunk
    together with the running max they are relative to (pms)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    L = tl.load(lens_ptr + b)
    n_cmp = tl.where(L >= BLOCK_L, (L - BLOCK_L) // STRIDE + 1, 0)
    n_chunks = (n_cmp + CH - 1) // CH
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kh * G + g
    rows = b * (Hkv * G) + heads  # [GP] rows of the [B, Hq] partial buffers
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    col = tl.arange(0, NBW)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dk[None, :],
                mask=gmask[:, None] & (dk[None, :] < DK), other=0.0)
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    c_lo = split * CPS
    c_hi = tl.minimum(c_lo + CPS, n_chunks)
    for c in range(c_lo, c_hi):
        sc = tl.zeros([GP, NBW], tl.float32)
        jb = c * NBC + col  # absolute selection blocks this chunk can touch
        for t in range(0, CH, BN):
            i = c * CH + t + tl.arange(0, BN)
            valid = i < n_cmp
            page = tl.load(bt_ptr + b * sbt_b + (i * STRIDE) // PAGE, mask=valid, other=0)
            row = i % E
            k = tl.load(kc_ptr + page[:, None].to(tl.int64) * skc_p + kh * skc_h
                        + row[:, None] * skc_e + dk[None, :],
                        mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
            v = tl.load(vc_ptr + page[:, None].to(tl.int64) * svc_p + kh * svc_h
                        + row[:, None] * svc_e + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale  # [GP, BN]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
            # Overlap weights (tokens shared by entry i and block jb) / d, as selection_weights.
            start = tl.maximum(i[:, None] * STRIDE, jb[None, :] * PAGE)
            end = tl.minimum(i[:, None] * STRIDE + BLOCK_L, (jb[None, :] + 1) * PAGE)
            w = tl.maximum(end - start, 0).to(tl.float32) / STRIDE
            sc = sc * alpha[:, None] + tl.dot(p, w, input_precision="ieee")
            m = m_new
        tl.store(pms_ptr + rows * MAXCH + c, m, mask=gmask)
        tl.store(psc_ptr + (rows * MAXCH + c)[:, None] * NBW + col[None, :], sc,
                 mask=gmask[:, None] & (col[None, :] < NSCORE))
    o = rows * NSPLIT + split
    tl.store(pm_ptr + o, m, mask=gmask)
    tl.store(pl_ptr + o, l, mask=gmask)
    tl.store(pacc_ptr + o[:, None] * DV + dv[None, :], acc, mask=gmask[:, None] & (dv[None, :] < DV))


@triton.jit
def _score_kernel(lens_ptr, pm_ptr, pl_ptr, pms_ptr, psc_ptr, score_ptr, Hkv,
                  G: tl.constexpr, GP: tl.constexpr, BLOCK_L: tl.constexpr, STRIDE: tl.constexpr,
                  PAGE: tl.constexpr, CH: tl.constexpr, NBC: tl.constexpr, NBW: tl.constexpr,
                  SPILL: tl.constexpr, MAXCH: tl.constexpr, CPS: tl.constexpr,
                  NSPLIT: tl.constexpr, NSPLIT_P: tl.constexpr, NBP: tl.constexpr, NBT: tl.constexpr):
    """Group-summed block scores for NBT blocks: Σ_h Σ_chunks partial · exp(m_chunk − M_h) / L_h."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    L = tl.load(lens_ptr + b)
    n_cmp = tl.where(L >= BLOCK_L, (L - BLOCK_L) // STRIDE + 1, 0)
    n_chunks = (n_cmp + CH - 1) // CH
    cur = (L - 1) // PAGE
    g = tl.arange(0, GP)
    gmask = g < G
    rows = b * (Hkv * G) + kh * G + g
    # Per-head softmax normalisers of the compressed branch (merge launch 1's splits).
    cidx = tl.arange(0, NSPLIT_P)
    cmask = gmask[:, None] & (cidx[None, :] < (n_chunks + CPS - 1) // CPS)
    cm = tl.load(pm_ptr + rows[:, None] * NSPLIT + cidx[None, :], mask=cmask, other=NEG)
    mx = tl.max(cm, 1)
    cl = tl.load(pl_ptr + rows[:, None] * NSPLIT + cidx[None, :], mask=cmask, other=0.0)
    tot = tl.sum(cl * tl.exp(cm - mx[:, None]), 1)
    inv = tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)
    j = tile * NBT + tl.arange(0, NBT)
    visible = j <= cur
    cj = j // NBC  # the chunk holding block j's entries; the chunk before spills into its start
    rj = j % NBC
    main_mask = gmask[:, None] & (visible & (cj < n_chunks))[None, :]
    mc = tl.load(pms_ptr + rows[:, None] * MAXCH + cj[None, :], mask=main_mask, other=NEG)
    sv = tl.load(psc_ptr + (rows[:, None] * MAXCH + cj[None, :]) * NBW + rj[None, :], mask=main_mask,
                 other=0.0)
    score = tl.sum(sv * (tl.exp(mc - mx[:, None]) * inv[:, None]), 0)
    if SPILL > 0:
        spill_mask = gmask[:, None] & (visible & (rj < SPILL) & (cj >= 1) & (cj - 1 < n_chunks))[None, :]
        ms = tl.load(pms_ptr + rows[:, None] * MAXCH + cj[None, :] - 1, mask=spill_mask, other=NEG)
        ss = tl.load(psc_ptr + (rows[:, None] * MAXCH + cj[None, :] - 1) * NBW + NBC + rj[None, :],
                     mask=spill_mask, other=0.0)
        score += tl.sum(ss * (tl.exp(ms - mx[:, None]) * inv[:, None]), 0)
    tl.store(score_ptr + pid * NBP + j, score)


@triton.jit
def _select_attend_kernel(q_ptr, sq_b, sq_h, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                          bt_ptr, sbt_b, wt_ptr, swt_b, lens_ptr, score_ptr,
                          sm_ptr, sl_ptr, sacc_ptr, wm_ptr, wl_ptr, wacc_ptr, sel_ptr,
                          scale, Hkv,
                          G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                          DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr,
                          NBP: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr, NUM_INIT: tl.constexpr,
                          NUM_LOCAL: tl.constexpr, WINDOW: tl.constexpr, RING: tl.constexpr,
                          RING_PAGES: tl.constexpr, UPS: tl.constexpr, NSPLIT: tl.constexpr,
                          WRITE_SEL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    Hq = Hkv * G
    L = tl.load(lens_ptr + b)
    cur = (L - 1) // PAGE  # the current (partially filled) block
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kh * G + g
    rows = b * Hq + heads
    j = tl.arange(0, NBP)
    visible = j <= cur
    score = tl.load(score_ptr + pid * NBP + j)

    # ---- forced blocks + top-n. Key = (float bits of score) << 32 | (2³¹ − 1 − j): scores are
    # ≥ 0 so their bits order like the floats; +inf bits for forced blocks; −1 for invisible ones.
    forced = ((j < NUM_INIT) | (j > cur - NUM_LOCAL)) & visible
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    bits = tl.where(forced, 0x7F800000, bits)
    key = (bits << 32) | (0x7FFFFFFF - j).to(tl.int64)
    key = tl.where(visible, key, -1)
    ks = tl.arange(0, NSP)
    sel = tl.full([NSP], -1, tl.int32)
    for t in range(NSEL):
        kmax = tl.max(key, 0)
        idx = tl.where(kmax >= 0, (0x7FFFFFFF - (kmax & 0x7FFFFFFF)).to(tl.int32), -1)
        sel = tl.where(ks == t, idx, sel)
        key = tl.where(j == idx, -1, key)
    if WRITE_SEL:
        if split == 0:
            tl.store(sel_ptr + pid * NSEL + ks, sel, mask=ks < NSEL)

    # ---- attention over this split's work units: units [0, NSEL) are the selected pages, units
    # [NSEL, NSEL + window pages) the window's pages (first_wp, first_wp + 1, …, cur).
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dk[None, :],
                mask=gmask[:, None] & (dk[None, :] < DK), other=0.0)
    win_lo = tl.maximum(L - WINDOW, 0)
    first_wp = win_lo // PAGE
    r_tok = tl.arange(0, PAGE)
    m_s = tl.full([GP], NEG, tl.float32)
    l_s = tl.zeros([GP], tl.float32)
    a_s = tl.zeros([GP, DVP], tl.float32)
    m_w = tl.full([GP], NEG, tl.float32)
    l_w = tl.zeros([GP], tl.float32)
    a_w = tl.zeros([GP, DVP], tl.float32)
    for uu in range(UPS):
        u = split * UPS + uu
        is_sel = u < NSEL
        sel_page = tl.sum(tl.where(ks == u, sel, 0), 0) + tl.where(is_sel, 0, -1)
        wk = first_wp + (u - NSEL)
        if RING:
            win_ok = (u >= NSEL) & (wk <= cur)
        else:
            already = tl.sum(tl.where((sel == wk) & (ks < NSEL), 1, 0), 0) > 0
            win_ok = (u >= NSEL) & (wk <= cur) & (~already)
        lp = tl.where(is_sel, sel_page, wk)  # logical page = selection block index
        ok = (is_sel & (sel_page >= 0)) | ((~is_sel) & win_ok)
        # Masked rather than branched, so the compiler can software-pipeline the unit loop; an
        # idle unit reads table entry 0 (always present) and masks all its K/V loads.
        if RING:
            phys = tl.where(is_sel, tl.load(bt_ptr + b * sbt_b + tl.where(ok & is_sel, lp, 0)),
                            tl.load(wt_ptr + b * swt_b + tl.where(ok & (~is_sel), lp % RING_PAGES, 0)))
        else:
            phys = tl.load(bt_ptr + b * sbt_b + tl.where(ok, lp, 0))
        phys = phys.to(tl.int64)
        # An idle unit gets positions ≥ L, so the one comparison below masks it: the CPU
        # interpreter turns (vector & scalar-bool) into int32 data, which its masked loads reject.
        pos = tl.where(ok, lp * PAGE, L) + r_tok
        tmask = pos < L
        kk = tl.load(k_ptr + phys * sk_p + kh * sk_h + r_tok[:, None] * sk_r + dk[None, :],
                     mask=tmask[:, None] & (dk[None, :] < DK), other=0.0)
        vv = tl.load(v_ptr + phys * sv_p + kh * sv_h + r_tok[:, None] * sv_r + dv[None, :],
                     mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
        s = _dot(q, tl.trans(kk), PREC, UPCAST) * scale  # [GP, PAGE]
        s_slc = tl.where((tmask & is_sel)[None, :], s, float("-inf"))
        if RING:
            in_win = tmask & (pos >= win_lo) & (~is_sel)
        else:
            in_win = tmask & (pos >= win_lo)
        s_win = tl.where(in_win[None, :], s, float("-inf"))
        mn = tl.maximum(m_s, tl.max(s_slc, 1))
        al = tl.exp(m_s - mn)
        pp = tl.exp(s_slc - mn[:, None])
        l_s = l_s * al + tl.sum(pp, 1)
        a_s = a_s * al[:, None] + _dot(pp.to(vv.dtype), vv, PREC, UPCAST)
        m_s = mn
        mn = tl.maximum(m_w, tl.max(s_win, 1))
        al = tl.exp(m_w - mn)
        pp = tl.exp(s_win - mn[:, None])
        l_w = l_w * al + tl.sum(pp, 1)
        a_w = a_w * al[:, None] + _dot(pp.to(vv.dtype), vv, PREC, UPCAST)
        m_w = mn
    o = rows * NSPLIT + split
    tl.store(sm_ptr + o, m_s, mask=gmask)
    tl.store(sl_ptr + o, l_s, mask=gmask)
    tl.store(sacc_ptr + o[:, None] * DV + dv[None, :], a_s, mask=gmask[:, None] & (dv[None, :] < DV))
    tl.store(wm_ptr + o, m_w, mask=gmask)
    tl.store(wl_ptr + o, l_w, mask=gmask)
    tl.store(wacc_ptr + o[:, None] * DV + dv[None, :], a_w, mask=gmask[:, None] & (dv[None, :] < DV))


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


def nsa_decode(q: torch.Tensor, gates: torch.Tensor, layer: PagedLayerCache, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, p: SparsityParams, win_tables: torch.Tensor | None = None,
               scale: float | None = None, return_selection: bool = False,
               num_splits: int | None = None, chunk: int | None = None, num_warps: int = 8):
    """NSA attention for one new token per sequence. q [B, Hq, Dk], gates [B, Hq, 3] → [B, Hq, Dv].

    seq_lens[b] ≥ 1 counts the current token, whose K/V and every summary it completes are already
    in the cache. With `return_selection` also returns the selected blocks [B, Hkv, n] (int32, best
    first, −1 where fewer than n blocks exist). `num_splits` / `chunk` override the split-K sizing
    (tests use them to exercise many splits at small shapes). 8 warps by default: with 4 the
    [64, 256] key tiles of dk = 192 spill registers (cuobjdump -res-usage, sm_90).
    """
    _check_inputs(q, gates, layer, block_tables, seq_lens, p, win_tables)
    B, Hq, Dk = q.shape
    _, Hkv, P, _ = layer.k_cache.shape
    Dv = layer.v_cache.shape[-1]
    G = Hq // Hkv
    E = P // p.stride
    max_pages = block_tables.shape[1]
    max_cmp = max(0, (max_pages * P - p.block) // p.stride + 1)
    # The largest chunk that still gives every SM work (fewer partials to merge); 256 would spill
    # registers (its [16, 128] score accumulator) with dk = 192.
    if chunk is None:
        chunk = next((c for c in (128,) if c % E == 0 and
                      B * Hkv * triton.cdiv(max_cmp, c) >= target_programs(q.device)), max(64, E))
    if chunk % E or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk ({chunk}) must be a power of two ≥ 16 and a multiple of l'/d = {E}")
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    dev = q.device
    f32 = torch.float32

    # Launch 1 sizing: chunks of CH entries, aligned to selection blocks (CH·d multiple of P).
    CH = chunk
    BN = min(64, CH)
    NBC = CH * p.stride // P
    SPILL = max(0, ((CH - 1) * p.stride + p.block - 1) // P + 1 - NBC)
    NBW = max(16, next_pow2(NBC + SPILL))
    MAXCH = max(1, triton.cdiv(max_cmp, CH))
    GP = max(16, next_pow2(G))
    DKP, DVP = next_pow2(Dk), next_pow2(Dv)
    prec = dot_precision(q.dtype)

    # Splits of CPS chunks each, enough of them to give every SM work.
    nsplit_c = max(1, min(MAXCH, triton.cdiv(target_programs(dev), B * Hkv)))
    cps = triton.cdiv(MAXCH, nsplit_c)
    nsplit_c = triton.cdiv(MAXCH, cps)
    pm = torch.empty(B, Hq, nsplit_c, device=dev, dtype=f32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B, Hq, nsplit_c, Dv, device=dev, dtype=f32)
    pms = torch.empty(B, Hq, MAXCH, device=dev, dtype=f32)
    psc = torch.empty(B, Hq, MAXCH, NBW, device=dev, dtype=f32)
    kc, vc = layer.kc_cache, layer.vc_cache
    _cmp_chunk_kernel[(B * Hkv, nsplit_c)](
        q, q.stride(0), q.stride(1), kc, kc.stride(0), kc.stride(1), kc.stride(2),
        vc, vc.stride(0), vc.stride(1), vc.stride(2), block_tables, block_tables.stride(0), seq_lens,
        pm, pl, pacc, pms, psc, scale, Hkv,
        G=G, GP=GP, DK=Dk, DKP=DKP, DV=Dv, DVP=DVP, BLOCK_L=p.block, STRIDE=p.stride, PAGE=P, E=E,
        CH=CH, BN=BN, NBC=NBC, NBW=NBW, NSCORE=NBC + SPILL, MAXCH=MAXCH, CPS=cps, NSPLIT=nsplit_c,
        PREC=prec, UPCAST=interpreter_upcast(q.dtype), num_warps=num_warps, num_stages=2)

    # Launch 2 sizing: work units = n selected pages + the window's pages, spread over splits.
    n_win_pages = (p.window - 1 + P - 1) // P + 1
    units = p.num_select + n_win_pages
    if num_splits is None:
        # One program per SM (measured: at batch 64 one split beats two; at batch 1 all units).
        num_splits = max(1, min(units, triton.cdiv(target_programs(dev) // 2, B * Hkv)))
    ups = triton.cdiv(units, num_splits)
    nsplit = triton.cdiv(units, ups)
    sm = torch.empty(B, Hq, nsplit, device=dev, dtype=f32)
    sl, wm, wl = torch.empty_like(sm), torch.empty_like(sm), torch.empty_like(sm)
    sacc = torch.empty(B, Hq, nsplit, Dv, device=dev, dtype=f32)
    wacc = torch.empty_like(sacc)
    NBP = max(16, next_pow2(max_pages))
    NBT = min(NBP, 128)
    scores = torch.empty(B, Hkv, NBP, device=dev, dtype=f32)
    _score_kernel[(B * Hkv, NBP // NBT)](
        seq_lens, pm, pl, pms, psc, scores, Hkv, G=G, GP=GP, BLOCK_L=p.block, STRIDE=p.stride, PAGE=P,
        CH=CH, NBC=NBC, NBW=NBW, SPILL=SPILL, MAXCH=MAXCH, CPS=cps, NSPLIT=nsplit_c,
        NSPLIT_P=next_pow2(nsplit_c), NBP=NBP, NBT=NBT, num_warps=4)

    sel = torch.empty(B, Hkv, p.num_select, device=dev, dtype=torch.int32) if return_selection else sm
    ring = win_tables is not None
    wt = win_tables if ring else block_tables
    k, v = layer.k_cache, layer.v_cache
    _select_attend_kernel[(B * Hkv, nsplit)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), block_tables, block_tables.stride(0),
        wt, wt.stride(0), seq_lens, scores, sm, sl, sacc, wm, wl, wacc, sel, scale, Hkv,
        G=G, GP=GP, DK=Dk, DKP=DKP, DV=Dv, DVP=DVP, PAGE=P, NBP=NBP, NSEL=p.num_select,
        NSP=max(2, next_pow2(p.num_select)), NUM_INIT=p.num_init, NUM_LOCAL=p.num_local,
        WINDOW=p.window, RING=ring, RING_PAGES=win_tables.shape[1] if ring else 1, UPS=ups,
        NSPLIT=nsplit, WRITE_SEL=return_selection, PREC=prec, UPCAST=interpreter_upcast(q.dtype),
        num_warps=num_warps)

    out = torch.empty(B, Hq, Dv, device=dev, dtype=q.dtype)
    _combine_kernel[(B * Hq,)](
        out, out.stride(0), out.stride(1), gates, gates.stride(0), gates.stride(1), seq_lens,
        pm, pl, pacc, sm, sl, sacc, wm, wl, wacc, Hq,
        NSA=True, BLOCK_L=p.block, STRIDE=p.stride, CH=CH * cps, NC_BUF=nsplit_c,
        NC_P=max(2, next_pow2(nsplit_c)), NS_BUF=nsplit, NS_P=max(2, next_pow2(nsplit)), DV=Dv, DVP=DVP,
        num_warps=4)
    if return_selection:
        return out, sel
    return out
