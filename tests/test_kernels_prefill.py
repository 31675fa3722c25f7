"""The Triton NSA prefill kernel equals the reference on fresh random inputs.

CPU: TRITON_INTERPRET=1 at small shapes (page 16, d 4, l 8: the paper's ratios). GPU (`-m gpu`): the
paper shape (64 q heads, 4 kv heads, dk 192, dv 128, l 32, d 16, l' 64, n 16, w 512) in bf16, and a
128k prompt. Every cache slot the kernel must not read (future tokens, unfinished summaries, the
padding page 0) holds NaN, so a stray read shows up in the output.

Selection ranks fp32 sums; the float64 reference can order two blocks differently when their scores
agree to ~1e-6. Such near-ties are checked to be ties in the reference's own scores, and only those
rows are left out of the output comparison.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_kernels.nsa_prefill import (PrefillConfig, _pow2, default_config, nsa_prefill,  # noqa: E402
                                      nsa_prefill_static, plan_prefill, split_head_dim, static_layout,
                                      static_plan)
from nsa_kernels.paged import PagedLayerCache, paged_nsa_attention_ref  # noqa: E402
from nsa_kernels.reference import (SparsityParams, _masked_attention, nsa_attention,  # noqa: E402
                                   num_compressed, num_select_blocks, selection_weights)

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
SMALL = SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32)
PAPER = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)


class Seq:
    """One sequence's full K/V, summaries and (independent K/V) window K/V as contiguous tensors."""

    def __init__(self, length, Hkv, Dk, Dv, p, independent, gen, dtype):
        def r(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)

        n = num_compressed(length, p.block, p.stride)
        self.length = length
        self.k, self.v = r(length, Hkv, Dk), r(length, Hkv, Dv)
        self.kc, self.vc = r(n, Hkv, Dk), r(n, Hkv, Dv)
        self.kw, self.vw = (r(length, Hkv, Dk), r(length, Hkv, Dv)) if independent else (self.k, self.v)


def build_cache(seqs, written, p, dtype, device, gen, ring_pages=None):
    """Pages in shuffled order; page 0 is padding. Only the first `written[b]` tokens of each
    sequence (and the summaries complete by then) are stored; everything else is NaN."""
    P, E = p.select_block, p.select_block // p.stride
    s0 = seqs[0]
    Hkv, Dk, Dv = s0.k.shape[1], s0.k.shape[2], s0.v.shape[2]
    need = [math.ceil(s.length / P) + (ring_pages or 0) for s in seqs]
    total = 1 + sum(need)
    perm = (torch.randperm(total - 1, generator=gen) + 1).tolist()
    layer = PagedLayerCache.allocate(total, Hkv, Dk, Dv, P, p.stride, dtype=dtype)
    for t in (layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache):
        t.fill_(float("nan"))
    maxp = max(math.ceil(s.length / P) for s in seqs) + 1
    bt = torch.zeros(len(seqs), maxp, dtype=torch.int32)
    wt = torch.zeros(len(seqs), ring_pages or 1, dtype=torch.int32)
    for b, (s, L) in enumerate(zip(seqs, written)):
        pages = [perm.pop() for _ in range(math.ceil(s.length / P))]
        bt[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(L):
            layer.k_cache[pages[pos // P], :, pos % P] = s.k[pos]
            layer.v_cache[pages[pos // P], :, pos % P] = s.v[pos]
        for i in range(num_compressed(L, p.block, p.stride)):
            layer.kc_cache[pages[i * p.stride // P], :, i % E] = s.kc[i]
            layer.vc_cache[pages[i * p.stride // P], :, i % E] = s.vc[i]
        if ring_pages:
            ring = [perm.pop() for _ in range(ring_pages)]
            wt[b] = torch.tensor(ring, dtype=torch.int32)
            R = ring_pages * P
            for pos in range(max(0, L - R), L):
                slot = pos % R
                layer.k_cache[ring[slot // P], :, slot % P] = s.kw[pos]
                layer.v_cache[ring[slot // P], :, slot % P] = s.vw[pos]
    to = lambda x: x.to(device)  # noqa: E731
    layer = PagedLayerCache(*(to(t) for t in (layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache)))
    return layer, to(bt), (to(wt) if ring_pages else None)


def ref_group_scores(q, positions, kc, vc, S, p, scale):
    """Float64 group-summed selection scores [Hkv, T, NB], as the reference ranks them."""
    Hq, Hkv = q.shape[1], kc.shape[1]
    G = Hq // Hkv
    N = kc.shape[0]
    i = torch.arange(N, device=q.device)
    mask = (i.unsqueeze(0) * p.stride + p.block - 1) <= positions.unsqueeze(1)
    kh = kc.permute(1, 0, 2).repeat_interleave(G, 0)
    vh = vc.permute(1, 0, 2).repeat_interleave(G, 0)
    _, pc = _masked_attention(q.permute(1, 0, 2), kh, vh, mask.unsqueeze(0), scale)
    NB = num_select_blocks(S, p.select_block)
    if pc.shape[-1] == 0:
        return torch.zeros(Hkv, q.shape[0], NB, dtype=q.dtype, device=q.device)
    W = selection_weights(N, NB, p.block, p.stride, p.select_block, dtype=pc.dtype, device=q.device)
    return torch.einsum("htn,nb->htb", pc, W).reshape(Hkv, G, q.shape[0], NB).sum(1)


def selection_mask(sel, NB):
    """Kernel block ids [T, Hkv, n] (−1 = none) → boolean [Hkv, T, NB]; each id at most once."""
    s = sel.permute(1, 0, 2).long()
    assert ((s >= -1) & (s < NB)).all(), "block id out of range"
    count = torch.zeros(*s.shape[:2], NB, dtype=torch.long, device=s.device)
    count.scatter_add_(-1, s.clamp(min=0), (s >= 0).long())
    assert int(count.max()) <= 1, "kernel selected a block twice"
    return count > 0


def check_selection(sel, chosen, scores, tol=1e-5, min_agree=0.9):
    """sel [T, Hkv, n] kernel block ids, chosen [Hkv, T, NB] reference mask. Returns the [T] rows whose
    selection agrees; asserts every disagreement is a near-tie in the reference's scores, and that
    at least `min_agree` of the rows agree (a caller checking one row at a time counts them itself)."""
    Hkv, T, NB = chosen.shape
    mine = selection_mask(sel, NB)
    diff = mine != chosen
    bad_rows = diff.any(-1)  # [Hkv, T]
    for h, t in bad_rows.nonzero().tolist():
        only_mine = (mine[h, t] & ~chosen[h, t]).nonzero().flatten()
        only_ref = (chosen[h, t] & ~mine[h, t]).nonzero().flatten()
        assert len(only_mine) == len(only_ref), f"row {t} group {h}: different counts"
        a, b = scores[h, t, only_mine], scores[h, t, only_ref]
        gap = (a.max() - b.min()).abs() if len(a) else 0.0
        assert gap <= tol * scores[h, t].abs().max().clamp(min=1e-30), (
            f"row {t} group {h}: kernel chose {only_mine.tolist()}, reference {only_ref.tolist()} "
            f"(scores {a.tolist()} vs {b.tolist()}) — not a near-tie")
    agree = ~bad_rows.any(0)
    assert agree.float().mean() >= min_agree, f"too many near-ties: {int((~agree).sum())} of {T} rows"
    return agree


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def run_case(lens, chunks, Hq, Hkv, Dk, Dv, p, dtype=torch.float32, independent=False, seed=None,
             config=None, tol=2e-4):
    """Chunk b holds the last chunks[b] tokens of a sequence of lens[b]. Compares the kernel with
    paged_nsa_attention_ref and with the whole-sequence reference (float64), selection included."""
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    seqs = [Seq(L, Hkv, Dk, Dv, p, independent, gen, torch.float32) for L in lens]
    ring_pages = None
    if independent:
        ring_pages = math.ceil((p.window + max(chunks) - 1) / p.select_block)
    layer, bt, wt = build_cache(seqs, lens, p, dtype, DEV, gen, ring_pages)
    Ttot = sum(chunks)
    q = torch.randn(Ttot, Hq, Dk, generator=gen).to(dtype).to(DEV)
    gates = torch.rand(Ttot, Hq, 3, generator=gen).to(dtype).to(DEV)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, sel = nsa_prefill(q, gates, layer, bt, cu, sl, p, win_tables=wt, config=config,
                           return_selection=True)
    assert out.dtype == dtype and out.shape == (Ttot, Hq, Dv)
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output (read an unwritten slot?)"

    layer64 = PagedLayerCache(*(t.double() for t in (layer.k_cache, layer.v_cache, layer.kc_cache,
                                                      layer.vc_cache)))
    paged = paged_nsa_attention_ref(q.double(), gates.double(), layer64, bt, cu, sl, p, win_tables=wt)
    scale = 1.0 / math.sqrt(Dk)
    agree_all = []
    for b, (s, T) in enumerate(zip(seqs, chunks)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if T == 0:
            continue
        pos = torch.arange(s.length - T, s.length, device=DEV)
        # the whole-sequence forward, on the (cache-dtype-rounded) contiguous tensors
        c = lambda x: x.to(dtype).double().to(DEV)  # noqa: E731
        whole, chosen = nsa_attention(q[lo:hi].double(), pos, c(s.kc), c(s.vc), c(s.k), c(s.v), c(s.kw),
                                      c(s.vw), gates[lo:hi].double(), p, return_selection=True)
        assert rel(paged[lo:hi], whole) < 1e-12, "paged reference disagrees with the whole-sequence one"
        scores = ref_group_scores(q[lo:hi].double(), pos, c(s.kc), c(s.vc), s.length, p, scale)
        agree = check_selection(sel[lo:hi], chosen, scores)
        e = rel(out[lo:hi][agree], whole[agree])
        assert e < tol, f"seed {seed}, sequence {b}: relative error {e:.2e}"
        agree_all.append(agree)
    return out, sel


SHAPE = dict(Dk=48, Dv=32)  # dk ≠ dv, dk split 32 + 16 like 192 = 128 + 64


@pytest.mark.parametrize("G", [1, 3, 4, 16, 24])  # 3 and 24: padded to 4 and 32 inside
def test_ragged_batch_matches_reference(G):
    # chunk lengths and starts off every multiple of d, l, l'; one prompt from token 0; one empty chunk
    run_case(lens=[117, 37, 90, 55], chunks=[30, 21, 0, 13], Hq=2 * G, Hkv=2, p=SMALL, **SHAPE)


def test_chunks_continue_one_sequence():
    """A prompt prefilled in four chunks equals the whole-sequence forward; each call sees a cache
    written only up to its own last token (the rest NaN)."""
    p = SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=24, num_init=1,
                       num_local=2)  # l not a multiple of l'/d, fractional-free but odd overlaps
    Hq, Hkv, Dk, Dv = 8, 2, 48, 32
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    S = 130
    s = Seq(S, Hkv, Dk, Dv, p, False, gen, torch.float32)
    q = torch.randn(S, Hq, Dk, generator=gen)
    gates = torch.rand(S, Hq, 3, generator=gen)
    outs, sels, start = [], [], 0
    for T in (29, 40, 1, 60):
        end = start + T
        layer, bt, _ = build_cache([s], [end], p, torch.float32, DEV, torch.Generator().manual_seed(end))
        cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
        o, sl = nsa_prefill(q[start:end].to(DEV), gates[start:end].to(DEV), layer, bt, cu,
                            torch.tensor([end], dtype=torch.int32, device=DEV), p, return_selection=True)
        outs.append(o)
        sels.append(sl)
        start = end
    out, sel = torch.cat(outs), torch.cat(sels)
    d = lambda x: x.double().to(DEV)  # noqa: E731
    pos = torch.arange(S, device=DEV)
    whole, chosen = nsa_attention(d(q), pos, d(s.kc), d(s.vc), d(s.k), d(s.v), d(s.k), d(s.v), d(gates), p,
                                  return_selection=True)
    scores = ref_group_scores(d(q), pos, d(s.kc), d(s.vc), S, p, 1.0 / math.sqrt(Dk))
    agree = check_selection(sel, chosen, scores)
    assert rel(out[agree], whole[agree]) < 2e-4


def test_independent_kv_window_ring():
    """Independent-branch K/V: the window reads its own ring (sized w + T − 1), not the raw pages."""
    run_case(lens=[100, 61], chunks=[38, 61], Hq=8, Hkv=2, p=SMALL, independent=True, **SHAPE)


@pytest.mark.parametrize("independent", [False, True], ids=["shared K/V", "independent K/V"])
def test_window_in_the_first_compressed_launch(independent):
    """win_fused: the window branch (and, shared K/V, the forced blocks) computed by the first
    compressed launch for its own tiles equals `_win_kernel`'s in those tiles bitwise (the
    compressed part rounded to acc's dtype before the window is added, as the separate kernel reads
    it back) — and, through run_case, the references. A tile size of its own for the window
    (rows_win 16) is unused then. With the sweeps in one launch (cmp_split 0) win_fused is
    ignored: the window kernel runs (the launch-config cases "sweeps in one launch")."""
    p = SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=24, num_init=1, num_local=2)
    lens, chunks = [117, 37, 90], [30, 21, 45]
    for dtype in (torch.float32, torch.bfloat16):
        tiles = dict(rows_cmp=32, rows_win=32, max_rows=64)
        fused = run_case(lens, chunks, Hq=8, Hkv=2, p=p, dtype=dtype, independent=independent, seed=3,
                         config=PrefillConfig(win_fused=1, **{**tiles, "rows_win": 16}),
                         tol=2e-4 if dtype == torch.float32 else 1.5e-2, **SHAPE)
        apart = run_case(lens, chunks, Hq=8, Hkv=2, p=p, dtype=dtype, independent=independent, seed=3,
                         config=PrefillConfig(win_fused=0, **tiles),
                         tol=2e-4 if dtype == torch.float32 else 1.5e-2, **SHAPE)
        assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])


@pytest.mark.parametrize("forced_win", [1, 0])
def test_forced_blocks_and_small_tiles(forced_win):
    """num_init 0, three local blocks, n = all visible early on; tiny query tiles and summary chunks.
    forced_win: the forced blocks attended by the window kernel a tile at a time (default) or by the
    selected-branch kernel."""
    p = SparsityParams(block=8, stride=4, select_block=16, num_select=3, window=16, num_init=0,
                       num_local=3)
    run_case(lens=[150], chunks=[70], Hq=4, Hkv=1, p=p, config=PrefillConfig(rows_cmp=16, cmp_chunk=16,
                                                                            max_rows=32, forced_win=forced_win),
             **SHAPE)


@pytest.mark.parametrize("forced_win,win_fused", [(1, 1), (1, 0), (0, 1)],
                         ids=["window in the first launch", "window kernel apart", "forced in the selected branch"])
@pytest.mark.parametrize("p", [SparsityParams(block=8, stride=4, select_block=16, num_select=5, window=48,
                                               num_init=2, num_local=1),
                               SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32,
                                              num_init=1, num_local=2)], ids=["two initial, one local", "paper's"])
def test_forced_blocks_across_window_tiles(p, forced_win, win_fused):
    # Group size 1: a window tile holds 64 queries, four to five blocks of 16, so its rows have
    # different forced blocks; chunk starts off the block size, a sequence starting inside block 1.
    # The window (and forced blocks) in the first compressed launch's tiles or in `_win_kernel`'s.
    run_case(lens=[200, 90, 23], chunks=[133, 61, 23], Hq=2, Hkv=2, p=p,
             config=PrefillConfig(forced_win=forced_win, win_fused=win_fused), **SHAPE)


@pytest.mark.parametrize("cfg", [PrefillConfig(score_sums=0), PrefillConfig(score_sums=0, score_cat=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16),
                                 PrefillConfig(score_sums=0, rows_cmp=16, cmp_chunk=16),
                                 PrefillConfig(stages_cmp=3, stages_win=3), PrefillConfig(score_sums=0, score_parts=3),
                                 PrefillConfig(cmp_packed=0), PrefillConfig(slc_topn=0, topn_groups=0),
                                 PrefillConfig(slc_topn=0, topn_groups=2),
                                 PrefillConfig(forced_win=0), PrefillConfig(score_hsum=0),
                                 PrefillConfig(score_hsum=0, rows_cmp=16, cmp_chunk=16),
                                 PrefillConfig(cmp_split=0), PrefillConfig(cmp_split=0, rows_cmp=16, cmp_chunk=16),
                                 PrefillConfig(cmp_split=0, score_sums=0),
                                 PrefillConfig(cmp_split=0, cmp_packed=0, score_hsum=0),
                                 PrefillConfig(rows_cmp2=0, warps_cmp2=0), PrefillConfig(rows_cmp2=16, warps_cmp2=2)],
                         ids=["scores as products", "scores in two products", "small tiles",
                              "scores as products, small tiles", "other stages", "p in three bf16 parts",
                              "summaries page by page", "top-n kernel", "top-n kernel over block groups",
                              "forced blocks in the selected branch", "heads summed per weight",
                              "heads summed per weight, small tiles", "sweeps in one launch",
                              "sweeps in one launch, small tiles", "sweeps in one launch, scores as products",
                              "sweeps in one launch, page by page, heads summed per weight",
                              "second sweep in the first's tiles", "second sweep in smaller tiles"])
def test_launch_configs_match_reference(cfg):
    # Configurations the benchmark sweeps: the block scores as matrix products against the overlap
    # weights (the default sums them in registers), of a chunk and its spill into the next in one
    # product of width 2·BJ or two of BJ, p in two or three bf16 parts; tiny tiles and summary chunks; other
    # pipeline depths; the top-n in its own kernel (the default: each selected-branch program takes
    # its own), over every block or block groups first; the forced blocks attended by the
    # selected-branch kernel (default: with the window branch); the group's heads summed once per
    # overlap weight (the default sums them first); the two compressed sweeps in one launch (the
    # default: two, the second reading the first's statistics, in tiles of its own size); the
    # second launch in the first's tiles or smaller ones. l = 12 with d = 4 spills a summary into the
    # next block, across the chunk's last block too.
    p = SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=24, num_init=1, num_local=2)
    run_case(lens=[117, 37, 90, 55], chunks=[30, 21, 0, 13], Hq=8, Hkv=2, p=p, config=cfg, **SHAPE)


@pytest.mark.parametrize("sums,hsum,split", [(1, 0, 1), (0, 0, 1), (1, 1, 1), (1, 1, 0)])
@pytest.mark.parametrize("chunk", [64, 16])
def test_scores_three_blocks_an_entry(chunk, sums, hsum, split):
    # l = 24, d = 4, l' = 16: a page's last entries reach two blocks past it (KSPAN 3), so the
    # in-register sums move a part two blocks on, and two blocks of it spill past a chunk's end
    # (the products' weight matrix holds the same spill).
    p = SparsityParams(block=24, stride=4, select_block=16, num_select=5, window=24, num_init=1, num_local=2)
    run_case(lens=[117, 61], chunks=[45, 61], Hq=8, Hkv=2, p=p,
             config=PrefillConfig(score_sums=sums, score_hsum=hsum, cmp_split=split, rows_cmp=16, cmp_chunk=chunk),
             **SHAPE)


@pytest.mark.parametrize("cfg", [PrefillConfig(rows_cmp=16, cmp_chunk=16),
                                 PrefillConfig(rows_cmp=32, cmp_chunk=32, score_sums=0, score_cat=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, mask_split=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, cmp_packed=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, score_hsum=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, cmp_split=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, cmp_split=0, mask_split=0),
                                 PrefillConfig(rows_cmp=16, cmp_chunk=16, rows_cmp2=0, warps_cmp2=0)],
                         ids=["small tiles", "scores in two products", "mask everywhere", "summaries page by page",
                              "heads summed per weight", "sweeps in one launch",
                              "sweeps in one launch, mask everywhere", "second sweep in the first's tiles"])
def test_mask_split_matches_reference(cfg):
    # mask_split (default): the compressed sweeps skip the causal mask on chunks every row of a
    # tile sees whole. Long enough prompts that tiles have such chunks (and a boundary chunk after
    # them); chunk starts off every multiple of d, l, l' and the summary chunk.
    p = SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=24, num_init=1, num_local=2)
    # Group size 3 (padded to 4): the padded head must add nothing to the group's scores.
    run_case(lens=[520, 90], chunks=[150, 90], Hq=6, Hkv=2, p=p, config=cfg, **SHAPE)


@pytest.mark.parametrize("p", [SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=24,
                                               num_init=1, num_local=2),
                               SparsityParams(block=8, stride=4, select_block=16, num_select=3, window=16,
                                              num_init=0, num_local=3)])
@pytest.mark.parametrize("slc_topn,topn_groups", [(1, 0), (0, 0), (0, 2)])
def test_topn_ties_go_to_the_lower_block(p, slc_topn, topn_groups):
    # q = 0: every visible block scores the same, so the choice is decided by ties alone: the
    # forced blocks first, then the lowest other indices, in that order (the reference's stable
    # sort), and −1 where fewer blocks are visible than n.
    Hq, Hkv, Dk, Dv, S = 4, 2, 48, 32, 150
    gen = torch.Generator().manual_seed(3)
    s = Seq(S, Hkv, Dk, Dv, p, False, gen, torch.float32)
    layer, bt, _ = build_cache([s], [S], p, torch.float32, DEV, gen)
    q = torch.zeros(S, Hq, Dk, device=DEV)
    gates = torch.rand(S, Hq, 3, generator=gen).to(DEV)
    cu = torch.tensor([0, S], dtype=torch.int32, device=DEV)
    sl = torch.tensor([S], dtype=torch.int32, device=DEV)
    sel = nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True,
                      config=replace(default_config(DEV), slc_topn=slc_topn, topn_groups=topn_groups))[1]
    P = p.select_block
    for t in (0, 37, 100, S - 1):
        cur = t // P
        forced = [j for j in range(cur + 1) if j < p.num_init or j > cur - p.num_local]
        rest = [j for j in range(cur + 1) if j not in forced]
        want = (forced + rest)[:p.num_select]
        want += [-1] * (p.num_select - len(want))
        assert sel[t, 0].tolist() == want, (t, sel[t, 0].tolist(), want)


@pytest.mark.parametrize("cfg", [PrefillConfig(slc_topn=0, topn_groups=2),
                                 PrefillConfig(slc_topn=0, topn_groups=4), PrefillConfig(),
                                 PrefillConfig(forced_win=0)],
                         ids=["groups of 2", "groups of 4", "in the selected-branch kernel (default)",
                              "in the selected-branch kernel, forced blocks there too"])
def test_topn_variants_select_the_same_blocks(cfg):
    # Long enough for the block groups to be used (25 blocks, NBP 32 ≥ 2 · NSP · group size). Every
    # top-n variant ranks the same fp32 scores exactly, so its selection equals the top-n kernel's
    # over every block, bit for bit (and the reference's away from near-ties: run_case, once).
    p = SparsityParams(block=12, stride=4, select_block=16, num_select=4, window=24, num_init=1, num_local=2)
    lens, chunks = [400, 300], [90, 60]
    if cfg.forced_win == 0:
        run_case(lens=lens, chunks=chunks, Hq=4, Hkv=2, p=p, config=cfg, **SHAPE)
    gen = torch.Generator().manual_seed(11)
    seqs = [Seq(L, 2, 48, 32, p, False, gen, torch.float32) for L in lens]
    layer, bt, _ = build_cache(seqs, lens, p, torch.float32, DEV, gen)
    q = torch.randn(sum(chunks), 4, 48, generator=gen).to(DEV)
    gates = torch.rand(sum(chunks), 4, 3, generator=gen).to(DEV)
    cu = torch.tensor([0, chunks[0], sum(chunks)], dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    base_cfg = PrefillConfig(slc_topn=0, topn_groups=0, forced_win=cfg.forced_win)
    base = nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True, config=base_cfg)
    got = nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True, config=cfg)
    assert (base[1][:, :, 3] >= 0).any()  # rows with non-forced picks exist
    assert torch.equal(got[1], base[1])
    assert torch.equal(got[0], base[0])


def test_half_precision():
    # acc_bf16 (the default) and not: the compressed + window sum handed to the selected-branch
    # kernel in bf16 or fp32 — both within the bound, and not the same bits (the knob takes effect).
    kw = dict(lens=[80, 50], chunks=[31, 50], Hq=8, Hkv=2, p=SMALL, dtype=torch.bfloat16, tol=1.5e-2, seed=11)
    a = run_case(config=PrefillConfig(acc_bf16=0), **kw, **SHAPE)[0]
    b = run_case(config=PrefillConfig(acc_bf16=1), **kw, **SHAPE)[0]
    assert not torch.equal(a, b)


def test_head_dim_split():
    assert split_head_dim(192) == (128, 64)
    assert split_head_dim(128) == (128, 0)
    assert split_head_dim(48) == (32, 16)
    assert split_head_dim(24) == (16, 16)  # 8 real columns, masked


def test_ring_too_short_is_refused():
    gen = torch.Generator().manual_seed(0)
    s = Seq(100, 1, 16, 16, SMALL, True, gen, torch.float32)
    layer, bt, wt = build_cache([s], [100], SMALL, torch.float32, DEV, gen, ring_pages=2)  # 32 tokens
    q = torch.randn(10, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="window ring"):
        nsa_prefill(q, torch.rand(10, 2, 3, device=DEV), layer, bt,
                    torch.tensor([0, 10], dtype=torch.int32, device=DEV),
                    torch.tensor([100], dtype=torch.int32, device=DEV), SMALL, win_tables=wt)


def test_bad_inputs_are_refused():
    gen = torch.Generator().manual_seed(0)
    s = Seq(40, 2, 16, 16, SMALL, False, gen, torch.float32)
    layer, bt, _ = build_cache([s], [40], SMALL, torch.float32, DEV, gen)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEV)
    sl = torch.tensor([40], dtype=torch.int32, device=DEV)
    g = torch.rand(5, 6, 3, device=DEV)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        nsa_prefill(torch.randn(5, 3, 16, device=DEV), g[:, :3], layer, bt, cu, sl, SMALL)
    with pytest.raises(ValueError, match="head dim"):
        nsa_prefill(torch.randn(5, 6, 32, device=DEV), g, layer, bt, cu, sl, SMALL)
    with pytest.raises(ValueError, match="queries but seq_len"):
        nsa_prefill(torch.randn(5, 6, 16, device=DEV), g, layer, bt, cu,
                    torch.tensor([3], dtype=torch.int32, device=DEV), SMALL)
    with pytest.raises(ValueError, match="page size"):
        nsa_prefill(torch.randn(5, 6, 16, device=DEV), g, layer, bt, cu, sl,
                    SparsityParams(block=8, stride=4, select_block=32, num_select=4, window=32))
    with pytest.raises(ValueError, match="score_parts"):
        nsa_prefill(torch.randn(5, 6, 16, device=DEV), g, layer, bt, cu, sl, SMALL,
                    config=PrefillConfig(score_parts=1))


def test_plan_built_once_gives_the_same_result():
    # An engine step builds the host-side layout once from its host lists (no device sync) and
    # passes it to every layer: the result must be bitwise the plain call's, for a ragged batch
    # with several row slices (max_rows 32) and an empty chunk; a plan made for another config or
    # other lengths is refused.
    gen = torch.Generator().manual_seed(5)
    lens, chunks = [117, 37, 90], [30, 0, 45]
    seqs = [Seq(L, 2, 16, 16, SMALL, False, gen, torch.float32) for L in lens]
    layer, bt, _ = build_cache(seqs, lens, SMALL, torch.float32, DEV, gen)
    q = torch.randn(75, 8, 16, generator=gen).to(DEV)
    gates = torch.rand(75, 8, 3, generator=gen).to(DEV)
    cu_l = [0, *torch.tensor(chunks).cumsum(0).tolist()]  # [0, 30, 30, 75]
    cu = torch.tensor(cu_l, dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    cfg = PrefillConfig(max_rows=32)
    plain = nsa_prefill(q, gates, layer, bt, cu, sl, SMALL, config=cfg)
    plan = plan_prefill(cu_l, lens, page_size=SMALL.select_block, group=4, device=DEV, config=cfg)
    assert len(plan.slices) == 3 and plan.total_rows == 75
    assert torch.equal(nsa_prefill(q, gates, layer, bt, cu, sl, SMALL, config=cfg, plan=plan), plain)
    with pytest.raises(ValueError, match="plan was made"):
        nsa_prefill(q, gates, layer, bt, cu, sl, SMALL, plan=plan)  # default config, not cfg
    other = plan_prefill([0, 30, 30, 70], [117, 37, 85], page_size=SMALL.select_block, group=4,
                         device=DEV, config=cfg)
    with pytest.raises(ValueError, match="Ttot=75"):
        nsa_prefill(q, gates, layer, bt, cu, sl, SMALL, config=cfg, plan=other)
    with pytest.raises(ValueError, match="queries but seq_len"):
        plan_prefill([0, 50], [40], page_size=16, group=4, device=DEV)


def _static_call(plan, layer, bt, lens, chunks, row0, gen, Hq, Dk, Dv, dtype=torch.float32, p=SMALL, wt=None):
    """One `nsa_prefill_static` call: the chunks at rows row0 … of the plan's rows, the other rows
    of q random and of out a sentinel; returns (out, the chunk rows' `nsa_prefill` output with
    the static plan's config, the sentinel). wt: window rings' tables (independent K/V)."""
    rows, seqs, pages = plan.static
    T = sum(chunks)
    q = torch.randn(rows, Hq, Dk, generator=gen).to(dtype).to(DEV)
    gates = torch.rand(rows, Hq, 3, generator=gen).to(dtype).to(DEV)
    tables = torch.zeros(seqs, pages, dtype=torch.int32, device=DEV)  # page 0: the NaN padding page
    tables[:bt.shape[0], :bt.shape[1]] = bt
    cu_l = [0, *torch.tensor(chunks).cumsum(0).tolist()]
    plan.meta.copy_(torch.from_numpy(static_layout(plan, cu_l, lens, row0)))
    sentinel = 7.0
    out = torch.full((rows, Hq, Dv), sentinel, dtype=dtype, device=DEV)
    win = None
    if wt is not None:  # fixed shape [seqs, ring pages]; rows past the call's: page 0 (NaN)
        win = torch.zeros(seqs, wt.shape[1], dtype=torch.int32, device=DEV)
        win[:wt.shape[0]] = wt
    nsa_prefill_static(q, gates, layer, tables, p, plan, out, win_tables=win)
    cu = torch.tensor(cu_l, dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    want = nsa_prefill(q[row0:row0 + T], gates[row0:row0 + T], layer, bt, cu, sl, p, config=plan.config,
                       win_tables=wt)
    return out, want, sentinel


@pytest.mark.parametrize("G", [1, 4])
def test_static_plan_gives_each_call_its_own_result(G):
    """A CUDA graph replays one launch configuration with other chunks each time: one static plan,
    laid out for a ragged batch at row 5 of q, then for other chunks (fewer sequences, a one-token
    chunk, other lengths) at row 0. Each call's chunk rows equal `nsa_prefill`'s for those chunks
    alone (same config: summaries page by page), bitwise; every other row of out is as it was (the
    rows a step's decode rows or padding hold). Tiles past a call's own have no rows."""
    gen = torch.Generator().manual_seed(11)
    Hq, Hkv, Dk, Dv = 2 * G, 2, 48, 32
    plan = static_plan(96, 4, 12, page_size=SMALL.select_block, group=G, device=DEV)
    # One tile list a tile size (the window's and the first sweep's 64 rows share one; the second
    # sweep's 128 rows have their own), each with room for rows // queries a tile + seqs tiles.
    sizes = {max(1, 64 // _pow2(G)), max(1, 128 // _pow2(G))}
    assert plan.config.cmp_packed == 0 and plan.slices[0][:2] == (0, 96)
    assert {bt: n for bt, (n, _) in plan.slices[0][2].items()} == {bt: 96 // bt + 4 for bt in sizes}
    for lens, chunks, row0 in (([117, 37, 55], [30, 21, 13], 5), ([90, 40], [60, 1], 0)):
        seqs = [Seq(L, Hkv, Dk, Dv, SMALL, False, gen, torch.float32) for L in lens]
        layer, bt, _ = build_cache(seqs, lens, SMALL, torch.float32, DEV, gen)
        out, want, sentinel = _static_call(plan, layer, bt, lens, chunks, row0, gen, Hq, Dk, Dv)
        T = sum(chunks)
        assert torch.equal(out[row0:row0 + T], want)
        assert (out[:row0] == sentinel).all() and (out[row0 + T:] == sentinel).all()


def test_static_plan_with_window_rings():
    """Independent K/V: a static plan's window branch reads each chunk's ring (win_tables, fixed
    shape), as `nsa_prefill` does with the same rings, bitwise; other rows untouched. Two layouts
    of one plan."""
    gen = torch.Generator().manual_seed(13)
    Hq, Hkv, Dk, Dv = 8, 2, 48, 32
    plan = static_plan(96, 4, 12, page_size=SMALL.select_block, group=4, device=DEV)
    for lens, chunks, row0 in (([117, 37, 55], [30, 21, 13], 5), ([90, 40], [60, 1], 0)):
        ring_pages = math.ceil((SMALL.window + max(chunks) - 1) / SMALL.select_block)
        seqs = [Seq(L, Hkv, Dk, Dv, SMALL, True, gen, torch.float32) for L in lens]
        layer, bt, wt = build_cache(seqs, lens, SMALL, torch.float32, DEV, gen, ring_pages)
        out, want, sentinel = _static_call(plan, layer, bt, lens, chunks, row0, gen, Hq, Dk, Dv, wt=wt)
        T = sum(chunks)
        assert torch.isfinite(want).all() and torch.equal(out[row0:row0 + T], want)
        assert (out[:row0] == sentinel).all() and (out[row0 + T:] == sentinel).all()


def test_static_plan_refusals():
    plan = static_plan(32, 2, 4, page_size=16, group=4, device=DEV)
    with pytest.raises(ValueError, match="do not fit a static plan"):
        static_layout(plan, [0, 1, 2, 3], [5, 5, 5])  # three sequences, room for two
    with pytest.raises(ValueError, match="do not fit a static plan"):
        static_layout(plan, [0, 20], [40], row0=20)  # rows 20 … 39 of 32
    with pytest.raises(ValueError, match="4 pages"):
        static_layout(plan, [0, 10], [70])  # 70 tokens: 5 pages of 16
    with pytest.raises(ValueError, match="rising from 0"):
        static_layout(plan, [1, 2], [5])
    with pytest.raises(ValueError, match="rows <="):
        static_plan(0, 2, 4, page_size=16, group=4, device=DEV)
    gen = torch.Generator().manual_seed(2)
    seqs = [Seq(40, 1, 16, 16, SMALL, False, gen, torch.float32)]
    layer, bt, _ = build_cache(seqs, [40], SMALL, torch.float32, DEV, gen)
    q, g = torch.zeros(32, 4, 16, device=DEV), torch.zeros(32, 4, 3, device=DEV)
    out = torch.zeros(32, 4, 16, device=DEV)
    tables = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
    dynamic = plan_prefill([0, 10], [40], page_size=16, group=4, device=DEV)
    with pytest.raises(ValueError, match="needs a plan from static_plan"):
        nsa_prefill_static(q, g, layer, tables, SMALL, dynamic, out)
    with pytest.raises(ValueError, match="plan's 32 rows"):
        nsa_prefill_static(q[:16], g[:16], layer, tables, SMALL, plan, out)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        nsa_prefill_static(q, g, layer, tables[:, :3], SMALL, plan, out)
    with pytest.raises(ValueError, match="win_tables must be int32"):
        nsa_prefill_static(q, g, layer, tables, SMALL, plan, out, win_tables=tables[:1])
    with pytest.raises(ValueError, match="shorter than the window"):
        nsa_prefill_static(q, g, layer, tables, SMALL, plan, out, win_tables=tables[:, :1])


# ---------------------------------------------------------------- GPU, paper shape -------------

gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def sampled_check(q, gates, layer, bt, cu, sl, p, out, sel, rows, tol=1.5e-2):
    """Compare `rows` of a big batch with the float64 whole-sequence reference, one kv group at a
    time (the reference repeats K/V per head, so a whole 64-head sequence would not fit)."""
    from nsa_kernels.paged import gather_sequence
    Hq, Hkv = q.shape[1], layer.k_cache.shape[1]
    G = Hq // Hkv
    cu_l, sl_l = cu.tolist(), sl.tolist()
    errs, tot_agree = [], 0
    for r in rows:
        b = max(i for i in range(len(sl_l)) if cu_l[i] <= r)
        pos = torch.tensor([sl_l[b] - (cu_l[b + 1] - r)], device=q.device)
        k, v, kc, vc = (x.double() for x in gather_sequence(layer, bt[b], sl_l[b], p))
        for h in range(Hkv):
            hs = slice(h * G, (h + 1) * G)
            gs = slice(h, h + 1)
            qq = q[r:r + 1, hs].double()
            whole, chosen = nsa_attention(qq, pos, kc[:, gs], vc[:, gs], k[:, gs], v[:, gs], k[:, gs],
                                          v[:, gs], gates[r:r + 1, hs].double(), p, return_selection=True)
            scores = ref_group_scores(qq, pos, kc[:, gs], vc[:, gs], sl_l[b], p, 1 / math.sqrt(q.shape[2]))
            if torch.equal(selection_mask(sel[r:r + 1, h:h + 1], chosen.shape[-1]), chosen):
                tot_agree += 1
                errs.append(rel(out[r:r + 1, hs], whole))
            else:  # must be a near-tie (counted against the 90 % below, not within its own one row)
                check_selection(sel[r:r + 1, h:h + 1], chosen, scores, tol=1e-4, min_agree=0.0)
    assert tot_agree >= 0.9 * len(rows) * Hkv
    assert max(errs) < tol, f"max relative error {max(errs):.2e}"
    return max(errs)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,Hq,acc_bf16,forced_win,slc_topn,sums,hsum,split", [
    (torch.bfloat16, 64, 0, 1, 1, 1, 0, 0), (torch.float16, 64, 0, 1, 1, 1, 0, 0), (torch.bfloat16, 48, 0, 1, 1, 1, 0, 0),
    (torch.bfloat16, 64, 1, 1, 1, 1, 0, 0), (torch.bfloat16, 64, 1, 0, 1, 1, 0, 0), (torch.bfloat16, 64, 1, 1, 0, 1, 0, 0),
    (torch.bfloat16, 48, 1, 0, 0, 1, 0, 0), (torch.bfloat16, 64, 1, 1, 1, 0, 0, 0), (torch.float16, 48, 1, 1, 1, 0, 0, 0),
    (torch.bfloat16, 64, 1, 1, 1, 1, 1, 0), (torch.float16, 48, 1, 1, 1, 1, 1, 0),
    (torch.bfloat16, 64, 1, 1, 1, 1, 1, 1), (torch.float16, 48, 1, 1, 1, 1, 1, 1), (torch.bfloat16, 48, 1, 1, 1, 0, 0, 1)])
def test_gpu_paper_shape_ragged_batch(dtype, Hq, acc_bf16, forced_win, slc_topn, sums, hsum, split):
    # Hq 48: group size 12, padded to 16 inside (the padded heads must add nothing to the scores).
    # forced_win 0: the forced blocks in the selected-branch kernel, as before the twenty-first session.
    # slc_topn 0: the top-n in its own kernel, over groups of 4 blocks first (the 9000-token
    # prompt has 141 blocks: too few for the default groups of 16 to be used). sums 0: the block
    # scores as bf16 matrix products (before the twenty-sixth session), 1: summed in registers;
    # hsum 1: the group's heads summed before the overlap weights; split 1: the compressed sweeps in
    # two launches.
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    p, Hkv, Dk, Dv = PAPER, 4, 192, 128
    lens, chunks = [9000, 3001, 5000], [2500, 3001, 777]
    seqs = [Seq(L, Hkv, Dk, Dv, p, False, gen, torch.float32) for L in lens]
    layer, bt, _ = build_cache(seqs, lens, p, dtype, DEV, gen)
    Ttot = sum(chunks)
    q = torch.randn(Ttot, Hq, Dk, generator=gen).to(dtype).to(DEV)
    gates = torch.rand(Ttot, Hq, 3, generator=gen).to(dtype).to(DEV)
    cu = torch.tensor([0, 2500, 5501, 6278], dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, sel = nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True,
                           config=replace(default_config(q.device), acc_bf16=acc_bf16, forced_win=forced_win,
                                          slc_topn=slc_topn, topn_groups=4, score_sums=sums,
                                          score_hsum=hsum, cmp_split=split))
    assert torch.isfinite(out).all()
    rows = torch.randint(0, Ttot, (24,), generator=gen).tolist() + [0, 2499, 2500, 5500, 5501, Ttot - 1]
    sampled_check(q, gates, layer, bt, cu, sl, p, out, sel, rows)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("Hq", [64, 48])
def test_gpu_window_in_the_first_compressed_launch(Hq):
    """win_fused at the paper shape in bf16: the same output and selections as the window kernel
    apart, bitwise (a ragged batch continuing three prompts; the references are checked against
    the separate kernel by the ragged-batch test)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    p, Hkv, Dk, Dv = PAPER, 4, 192, 128
    lens, chunks = [9000, 3001, 5000], [2500, 3001, 777]
    seqs = [Seq(L, Hkv, Dk, Dv, p, False, gen, torch.float32) for L in lens]
    layer, bt, _ = build_cache(seqs, lens, p, torch.bfloat16, DEV, gen)
    q = torch.randn(sum(chunks), Hq, Dk, generator=gen).to(torch.bfloat16).to(DEV)
    gates = torch.rand(sum(chunks), Hq, 3, generator=gen).to(torch.bfloat16).to(DEV)
    cu = torch.tensor([0, 2500, 5501, 6278], dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    outs = [nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True,
                        config=replace(default_config(q.device), win_fused=f, rows_win=64))
            for f in (0, 1)]
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])


@gpu
@pytest.mark.gpu
def test_gpu_static_plan_paper_shape():
    """`nsa_prefill_static` at the paper shape in bf16 (what the engine's piecewise prefill graphs
    replay): two layouts of one plan, chunk rows bitwise `nsa_prefill`'s, other rows untouched."""
    gen = torch.Generator().manual_seed(4)
    plan = static_plan(1024, 8, 64, page_size=PAPER.select_block, group=16, device=DEV)
    for lens, chunks, row0 in (([3000, 700, 2049], [500, 300, 1], 17), ([4000], [1000], 0)):
        seqs = [Seq(L, 4, 192, 128, PAPER, False, gen, torch.bfloat16) for L in lens]
        layer, bt, _ = build_cache(seqs, lens, PAPER, torch.bfloat16, DEV, gen)
        out, want, sentinel = _static_call(plan, layer, bt, lens, chunks, row0, gen, 64, 192, 128,
                                           dtype=torch.bfloat16, p=PAPER)
        T = sum(chunks)
        assert torch.equal(out[row0:row0 + T], want)
        assert (out[:row0] == sentinel).all() and (out[row0 + T:] == sentinel).all()


@pytest.mark.gpu
def test_gpu_128k_prompt_fits():
    """A 131072-token prompt in one call on an 80 GB card (the launcher slices rows internally)."""
    p, Hq, Hkv, Dk, Dv, S = PAPER, 64, 4, 192, 128, 131072
    P = p.select_block
    torch.manual_seed(0)
    npg = S // P
    layer = PagedLayerCache(torch.randn(npg + 1, Hkv, P, Dk, device=DEV, dtype=torch.bfloat16),
                            torch.randn(npg + 1, Hkv, P, Dv, device=DEV, dtype=torch.bfloat16),
                            torch.randn(npg + 1, Hkv, P // p.stride, Dk, device=DEV, dtype=torch.bfloat16),
                            torch.randn(npg + 1, Hkv, P // p.stride, Dv, device=DEV, dtype=torch.bfloat16))
    bt = (torch.randperm(npg, device=DEV) + 1).int().unsqueeze(0)
    q = torch.randn(S, Hq, Dk, device=DEV, dtype=torch.bfloat16)
    gates = torch.rand(S, Hq, 3, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, S], dtype=torch.int32, device=DEV)
    sl = torch.tensor([S], dtype=torch.int32, device=DEV)
    torch.cuda.reset_peak_memory_stats()
    out, sel = nsa_prefill(q, gates, layer, bt, cu, sl, p, return_selection=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"128k prefill peak memory {peak:.1f} GiB")
    assert torch.isfinite(out).all()
    sampled_check(q, gates, layer, bt, cu, sl, p, out, sel, [S - 1, S // 2 + 17, 70000])


@gpu
@pytest.mark.gpu
def test_gpu_chunks_continue_one_sequence():
    """Paper shape: a 12000-token prompt in chunks of 2900/4096/5004 equals one call (and the reference)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    p, Hq, Hkv, Dk, Dv, S = PAPER, 64, 4, 192, 128, 12000
    seqs = [Seq(S, Hkv, Dk, Dv, p, False, gen, torch.float32)]
    layer, bt, _ = build_cache(seqs, [S], p, torch.bfloat16, DEV, gen)
    q = torch.randn(S, Hq, Dk, generator=gen).to(torch.bfloat16).to(DEV)
    gates = torch.rand(S, Hq, 3, generator=gen).to(torch.bfloat16).to(DEV)
    i32 = dict(dtype=torch.int32, device=DEV)
    one, sel_one = nsa_prefill(q, gates, layer, bt, torch.tensor([0, S], **i32), torch.tensor([S], **i32), p,
                               return_selection=True)
    outs, sels, start = [], [], 0
    for T in (2900, 4096, 5004):
        end = start + T
        o, s = nsa_prefill(q[start:end], gates[start:end], layer, bt, torch.tensor([0, T], **i32),
                           torch.tensor([end], **i32), p, return_selection=True)
        outs.append(o)
        sels.append(s)
        start = end
    assert torch.equal(torch.cat(sels), sel_one)
    assert rel(torch.cat(outs), one) < 1e-3
    rows = [0, 2899, 2900, 6995, 6996, S - 1] + torch.randint(0, S, (10,), generator=gen).tolist()
    sampled_check(q, gates, layer, bt, torch.tensor([0, S], **i32), torch.tensor([S], **i32), p,
                  one, sel_one, rows)
