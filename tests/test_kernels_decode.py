"""The Triton decode kernels equal the paged reference (kernels/paged.py) on fresh random inputs.

CPU: small shapes under TRITON_INTERPRET=1. GPU (`-m gpu`): the paper shape, bf16/fp16, CUDA graphs.
Outputs are compared with a float64 reference by ‖out − ref‖ / ‖ref‖; selected blocks are compared
as sets with the reference's `select_blocks` (float32 inputs, so near-ties cannot flip).
"""

import math

import pytest
import torch
import triton.language as tl

from kernels_interpret import DEVICE, load_kernels
from nsa_kernels.paged import PagedLayerCache, gather_ring, gather_sequence, paged_nsa_attention_ref
from nsa_kernels.reference import SparsityParams, nsa_attention
from script_helpers import load_script

utils_mod, _, dense_mod, nsa_mod = load_kernels()
triton_release = utils_mod.triton_release

SMALL = SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32)
DENSE_LAUNCHES = ("ahead", "previous")  # dense_decode.DENSE_LAUNCH
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_case(lens, Hkv, G, Dk, Dv, p, dtype=torch.float32, ring=False, device=DEVICE, seed=0,
              spare_pages=3):
    """Random caches, shuffled (non-contiguous) page tables padded with 0, random q and gates.

    ring: False (shared K/V) or the number of window-ring pages (independent K/V; ≥ w/P)."""
    gen = torch.Generator().manual_seed(seed)
    P = p.select_block
    E = P // p.stride
    B = len(lens)
    maxp = max(1, max(math.ceil(L / P) for L in lens)) + 1  # one padding column
    ring_pages = int(ring)
    n_pages = B * (maxp + ring_pages) + spare_pages

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    layer = PagedLayerCache(rnd(n_pages, Hkv, P, Dk), rnd(n_pages, Hkv, P, Dv),
                            rnd(n_pages, Hkv, E, Dk), rnd(n_pages, Hkv, E, Dv))
    perm = torch.randperm(n_pages, generator=gen)
    tables = torch.zeros(B, maxp, dtype=torch.int32)
    win = torch.zeros(B, max(1, ring_pages), dtype=torch.int32)
    nxt = 0
    for b, L in enumerate(lens):
        n = math.ceil(L / P)
        tables[b, :n] = perm[nxt:nxt + n].to(torch.int32)
        nxt += n
        if ring:
            win[b] = perm[nxt:nxt + ring_pages].to(torch.int32)
            nxt += ring_pages
    q = rnd(B, Hkv * G, Dk)
    gates = torch.rand(B, Hkv * G, 3, generator=gen).to(device=device, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return (q, gates, layer, tables.to(device), seq_lens, win.to(device) if ring else None)


def as64(layer):
    return PagedLayerCache(*(t.double() for t in (layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache)))


def reference(q, gates, layer, tables, seq_lens, p, win, dense=False):
    B = q.shape[0]
    return paged_nsa_attention_ref(q.double(), gates.double(), as64(layer), tables,
                                   torch.arange(B + 1, device=q.device), seq_lens, p, win, dense=dense)


def reference_selection(q, gates, layer, tables, seq_lens, p, win):
    """[B] list of per-kv-group sets of chosen blocks, from reference.nsa_attention."""
    out = []
    for b, L in enumerate(seq_lens.tolist()):
        k, v, kc, vc = gather_sequence(layer, tables[b], L, p)
        kw, vw = (gather_ring(layer, win[b], win.shape[1] * p.select_block, L) if win is not None else (k, v))
        _, chosen = nsa_attention(q[b:b + 1], torch.tensor([L - 1], device=q.device), kc, vc, k, v, kw, vw,
                                  gates[b:b + 1], p, return_selection=True)
        out.append([set(torch.nonzero(chosen[h, 0]).flatten().tolist()) for h in range(chosen.shape[0])])
    return out


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


# References of check_nsa's cases, by the arguments that determine the case's inputs (make_case is
# seeded, so equal arguments give equal inputs): the launch-variant tests check one case against
# many launch configurations, and the float64 reference at the paper shape is most of their time.
_REFERENCES: dict[tuple, tuple] = {}


def check_nsa(lens, Hkv, G, Dk, Dv, p, ring=False, dtype=torch.float32, tol=1e-5, device=DEVICE,
              fn=None, **kw):
    q, gates, layer, tables, seq_lens, win = make_case(lens, Hkv, G, Dk, Dv, p, dtype, ring, device)
    out, sel = (fn or nsa_mod.nsa_decode)(q, gates, layer, tables, seq_lens, p, win_tables=win,
                                          return_selection=True, **kw)
    assert out.shape == (len(lens), Hkv * G, Dv) and out.dtype == dtype
    assert torch.isfinite(out).all()
    key = (tuple(lens), Hkv, G, Dk, Dv, p, ring, dtype, str(device))
    if key not in _REFERENCES:
        ref = reference(q, gates, layer, tables, seq_lens, p, win)
        want = reference_selection(q, gates, layer, tables, seq_lens, p, win) if dtype == torch.float32 else None
        _REFERENCES[key] = (ref, want)
    ref, want = _REFERENCES[key]
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.2e} ≥ {tol:.0e}"
    if dtype == torch.float32:
        for b in range(len(lens)):
            for h in range(Hkv):
                got = [j for j in sel[b, h].tolist() if j >= 0]
                assert len(got) == len(set(got)), f"duplicate block in {got}"
                assert set(got) == want[b][h], f"seq {b} group {h}: {sorted(got)} != {sorted(want[b][h])}"
    return err


# Ragged batch: lengths < l, exactly on page boundaries, one past, long enough for many chunks.
RAGGED = [1, 5, 16, 17, 64, 150, 160]


@pytest.mark.parametrize("G", [1, 4, 16, 24])  # 24: "16 and more", padded to 32 inside
def test_nsa_decode_matches_reference_group_sizes(G):
    check_nsa(RAGGED if G < 16 else [3, 33, 160], Hkv=2, G=G, Dk=24, Dv=16, p=SMALL, chunk=16)


@pytest.mark.parametrize("ring", [False, 2, 3])  # shared K/V; ring of w; ring of w + P (prefill)
def test_nsa_decode_both_kv_layouts(ring):
    # num_splits=3 puts selected and window pages in the same split and across splits.
    check_nsa([2, 31, 32, 47, 200], Hkv=2, G=4, Dk=32, Dv=16, p=SMALL, ring=ring, chunk=16, num_splits=3)


@pytest.mark.parametrize("ring", [False, 3])
@pytest.mark.parametrize("splits,fuse", [(1, True), (2, False), (4, True), (6, False)])
def test_nsa_decode_split_shares(splits, fuse, ring):
    # Each split takes its share of the sequence's own window pages and of the selected pages left
    # to read (the remainder to the last splits); 6 splits > n = 4 leave some with no selected page,
    # and the window (1-3 pages here, on and off page boundaries) leaves some with none.
    check_nsa([2, 31, 32, 47, 200, 65], Hkv=2, G=4, Dk=32, Dv=16, p=SMALL, ring=ring, chunk=16,
              num_splits=splits, fuse_combine=fuse, fn=nsa_mod.nsa_decode_tuned)


@pytest.mark.parametrize("merge_chunk", [1, 2, 4])
@pytest.mark.parametrize("splits,programs", [(3, 64), (6, 1)])
def test_nsa_decode_fused_merge_chunks(merge_chunk, splits, programs):
    # The fused merge (the attention kernel's last split) takes 1, 2 or 4 splits a step: one step's
    # [GP] and [GP, DVP] loads, or [GP, k, DVP] tiles summed over k, with split counts that are not
    # multiples of k (3 and 6 attention splits; 64 programs give the compressed pass several).
    check_nsa([2, 31, 32, 47, 200, 65], Hkv=2, G=4, Dk=32, Dv=16, p=SMALL, chunk=16, num_splits=splits,
              cmp_programs=programs, fuse_combine=True, merge_chunk=merge_chunk, fn=nsa_mod.nsa_decode_tuned)


def test_nsa_decode_merge_defaults_follow_the_triton_release():
    # Measured per release (MERGE_CHUNK's comment): Triton 3.6 merges four splits a step and fuses
    # up to 8; later releases one a step, fusing up to 4. A bad chunk is refused.
    assert triton_release("3.6.0") == (3, 6) and triton_release("3.10.0rc1") == (3, 10)
    assert triton_release("3.9.0+git1a2b") == (3, 9) and triton_release("4.0") == (4, 0)
    assert triton_release("3.9rc1") == (3, 9) and triton_release("3.10a0") == (3, 10) and triton_release("4") == (4, 0)
    later = triton_release() > (3, 6)
    assert nsa_mod.LATER_TRITON == later
    assert (nsa_mod.MERGE_CHUNK, nsa_mod.FUSE_MAX_SPLITS) == ((1, 4) if later else (4, 8))
    q, gates, layer, tables, seq_lens, _ = make_case([40, 7], 1, 2, 16, 16, SMALL)
    with pytest.raises(ValueError, match="merge_chunk"):
        nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, merge_chunk=3)


@pytest.mark.parametrize("ring", [False, 3])
@pytest.mark.parametrize("splits,fuse,programs", [(1, True, None), (3, False, 64), (4, True, 64), (6, False, None)])
def test_nsa_decode_values_after_keys(ring, splits, fuse, programs):
    # The compressed pass reads values after keys (its p read back) and the score programs wait for
    # their group's key splits only; ragged lengths include ones with no compressed entry, and
    # programs=64 gives the pass several splits a group.
    check_nsa([2, 31, 32, 47, 200, 65], Hkv=2, G=4, Dk=32, Dv=16, p=SMALL, ring=ring, chunk=16,
              num_splits=splits, fuse_combine=fuse, cmp_programs=programs, values_after_keys=True,
              fn=nsa_mod.nsa_decode_tuned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nsa_decode_values_after_keys_half(dtype):
    check_nsa([40, 300, 7], Hkv=2, G=4, Dk=24, Dv=16, p=SMALL, dtype=dtype, tol=1e-2, chunk=16, num_splits=3,
              values_after_keys=True, fn=nsa_mod.nsa_decode_tuned)


def test_nsa_decode_values_after_keys_default_rule():
    # On by default only where it was measured faster: with PDL and more than SMALL_GROUPS groups.
    small = nsa_mod.SMALL_GROUPS
    assert nsa_mod._values_after_keys(small + 1, True) and nsa_mod._values_after_keys(256, True)
    assert not nsa_mod._values_after_keys(small, True) and not nsa_mod._values_after_keys(256, False)


def test_nsa_decode_values_after_keys_counters_reset_and_calls_repeat():
    # The pass counts each group's finished key splits for the score programs; the last score
    # program of a group resets the count, so repeated calls see fresh counts and equal outputs.
    q, gates, layer, tables, seq_lens, _ = make_case([300, 77, 5], 2, 4, 16, 16, SMALL)
    outs = [nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, cmp_programs=64,
                                     values_after_keys=True) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert int(nsa_mod._COUNTERS[q.device].abs().sum()) == 0


@pytest.mark.parametrize("p", [
    SparsityParams(block=16, stride=16, select_block=16, num_select=3, window=16),  # l = d = l' (fla)
    SparsityParams(block=12, stride=4, select_block=16, num_select=5, window=48, num_init=2),
    SparsityParams(block=40, stride=8, select_block=16, num_select=4, window=32, num_local=1),  # l > l'
])
def test_nsa_decode_other_sparsity_shapes(p):
    check_nsa([7, 16, 41, 130, 191], Hkv=1, G=2, Dk=16, Dv=24, p=p, chunk=16, num_splits=2)


@pytest.mark.parametrize("Dk,programs,attend_split,fuse", [(48, 64, True, False), (40, 1, True, True),
                                                            (40, 64, False, True), (48, 1, True, False)])
def test_nsa_decode_dk_split_and_many_compressed_splits(Dk, programs, attend_split, fuse):
    # Dk = 48 runs as 32 + 16 dots, 40 as 32 + 16 with the tail masked (or padded to 64 in the
    # attention kernel). cmp_programs = 64 gives every tile of the compressed pass its own split
    # (one tile each), 1 a single split. fuse: the split merge in the attention kernel's last split
    # (True) or in the separate combine launch.
    check_nsa(RAGGED, Hkv=2, G=4, Dk=Dk, Dv=16, p=SMALL, chunk=16, fn=nsa_mod.nsa_decode_tuned,
              cmp_programs=programs, attend_split_dk=attend_split, fuse_combine=fuse, num_splits=3)


def test_nsa_decode_eviction_hints_change_nothing_but_caching():
    # cmp_evict only adds L2 eviction hints to the compressed pass's loads and stores: the results
    # must be bitwise those without them.
    q, gates, layer, tables, seq_lens, _ = make_case(RAGGED, 2, 4, 48, 16, SMALL, seed=3)
    on, sel_on = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, cmp_evict=True,
                                          return_selection=True)
    off, sel_off = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, cmp_evict=False,
                                            return_selection=True)
    assert torch.equal(on, off) and torch.equal(sel_on, sel_off)


@pytest.mark.parametrize("topn", ["sort", "cand"])
def test_nsa_decode_selection_across_score_tiles(topn):
    # > 128 pages: the block scores come from several tile programs and the group's last-arriving
    # one takes the top-n over all of them (a top-n over its own tile only would miss blocks);
    # "cand": each program's first block gets its spill from the previous program's last page.
    p = SparsityParams(block=8, stride=4, select_block=16, num_select=8, window=32)
    check_nsa([40, 2500, 4000], Hkv=1, G=2, Dk=16, Dv=16, p=p, chunk=64, fn=nsa_mod.nsa_decode_tuned,
              topn=topn)


SPILL_CASES = {
    # The summary that ends page 127 (the last page of score program 0, 128 pages a program) also
    # covers block 128's first tokens.
    "one page": (SparsityParams(block=8, stride=4, select_block=16, num_select=8, window=32),
                 4000, 127, 3, 64, {127, 128}),
    # l > l': a summary spans three pages, so page 63's entry 1 (tokens 1016–1055) spills into
    # blocks 64 (k = 1) and 65 (k = 2), the second program's first two (64 pages a program).
    "two pages": (SparsityParams(block=40, stride=8, select_block=16, num_select=4, window=32, num_local=1),
                  3000, 63, 1, 16, {64, 65}),
    # Page 62's entry 0 (tokens 992–1031) spills into block 63 (k = 1) and, two pages on, into
    # block 64 (k = 2), the second program's first block: its edge is the previous tile's
    # next-to-last page, not its last.
    "two pages, second to last": (SparsityParams(block=40, stride=8, select_block=16, num_select=5, window=32,
                                                 num_local=1),
                                  3000, 62, 0, 16, {62, 63, 64}),
}


@pytest.mark.parametrize("case", list(SPILL_CASES))
def test_nsa_decode_candidate_topn_spill_across_programs(case):
    # One summary made to dominate must select the blocks it spills into; the second program's
    # share of it reaches that program only through its edge rows.
    p, length, page, entry, chunk, blocks = SPILL_CASES[case]
    q, gates, layer, tables, seq_lens, _ = make_case([length], 1, 2, 16, 16, p, seed=7)
    layer.kc_cache[int(tables[0, page]), 0, entry] = 8 * q[0].mean(0) / q[0].mean(0).norm()
    _, sel = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, p, chunk=chunk, topn="cand",
                                      return_selection=True)
    want = reference_selection(q, gates, layer, tables, seq_lens, p, None)
    assert blocks <= want[0][0]
    assert set(sel[0, 0].tolist()) - {-1} == want[0][0]
    check_nsa([length, 1100, 40], 1, 2, 16, 16, p, fn=nsa_mod.nsa_decode_tuned, topn="cand", chunk=chunk)


def test_nsa_decode_candidate_topn_ties_across_programs():
    # q = 0: every interior block ties, across both score programs (250 pages, 128 a program), so
    # the candidates' top-n must give the same list, in the same order, as the top-n over all.
    p = SparsityParams(block=8, stride=4, select_block=16, num_select=8, window=32)
    q, gates, layer, tables, seq_lens, _ = make_case([4000, 2100], 1, 2, 16, 16, p)
    q.zero_()
    got = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, p, chunk=64, topn="cand",
                                   return_selection=True)[1]
    want = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, p, chunk=64, topn="sort",
                                    return_selection=True)[1]
    assert torch.equal(got, want)
    assert got[0, 0].tolist()[:3] == [0, 248, 249]  # forced: initial, then the two local blocks
    assert int(nsa_mod._COUNTERS[q.device].abs().sum()) == 0


def test_nsa_decode_arrival_counters_reset_and_calls_repeat():
    # The last-arriving program of each group resets its counter, so every call starts from zero
    # and gives the same result (a stale count would pick the wrong "last" split).
    q, gates, layer, tables, seq_lens, _ = make_case(RAGGED, 2, 4, 24, 16, SMALL, seed=3)
    outs = [nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, num_splits=3,
                                     cmp_programs=64, fuse_combine=True) for _ in range(3)]
    assert int(nsa_mod._COUNTERS[q.device].abs().sum()) == 0
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_nsa_decode_ties_go_to_lower_block():
    # q = 0 makes every logit 0; with N = 32 visible summaries each p_cmp is exactly 1/32, so all
    # interior blocks score exactly the same in any summation order: lower block indices must win.
    q, gates, layer, tables, seq_lens, win = make_case([132, 135], 2, 2, 16, 16, SMALL)
    q.zero_()
    out, sel = nsa_mod.nsa_decode(q, gates, layer, tables, seq_lens, SMALL, return_selection=True, chunk=16)
    want = reference_selection(q, gates, layer, tables, seq_lens, SMALL, None)
    for b in range(2):
        for h in range(2):
            assert set(sel[b, h].tolist()) - {-1} == want[b][h]
    assert want[0][0] == {0, 1, 7, 8}  # forced 0, 7, 8; block 1 wins the tie with blocks 2 … 6
    assert rel_err(out, reference(q, gates, layer, tables, seq_lens, SMALL, None)) < 1e-5


def test_nsa_decode_small_batch_tiling():
    # At most SMALL_GROUPS kv groups the default takes SMALL_TILE-entry tiles at two programs an SM;
    # more groups, or a caller's program count, keep CMP_TILE. Both defaults equal the reference.
    dev = torch.device(DEVICE)
    two = nsa_mod.target_programs(dev)
    assert nsa_mod._cmp_tiling(nsa_mod.SMALL_GROUPS, 4, None, dev) == (nsa_mod.SMALL_TILE, two)
    assert nsa_mod._cmp_tiling(nsa_mod.SMALL_GROUPS + 1, 4, None, dev) == (nsa_mod.CMP_TILE, None)
    assert nsa_mod._cmp_tiling(1, 4, 7, dev) == (nsa_mod.CMP_TILE, 7)
    assert nsa_mod._cmp_tiling(1, 64, None, dev)[0] == max(nsa_mod.SMALL_TILE, 64)
    p = SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32)
    check_nsa([700, 301], Hkv=2, G=4, Dk=24, Dv=16, p=p)  # 4 groups: small tiles
    check_nsa([700, 301, 5, 90, 64], Hkv=2, G=4, Dk=24, Dv=16, p=p)  # 10 groups: CMP_TILE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nsa_decode_half_precision(dtype):
    check_nsa([9, 100, 170], Hkv=2, G=4, Dk=24, Dv=16, p=SMALL, dtype=dtype, tol=2e-2, chunk=16)


@pytest.mark.parametrize("fuse", [True, False])
def test_nsa_decode_bf16_partials(fuse):
    # The splits' partial output rows stored in bf16 (the default for bf16 inputs; both merges read
    # them): still within the bf16 bound of the float64 reference, and not the fp32 partials' bits
    # (the knob takes effect). fp32 and fp16 inputs keep fp32 rows (other tests: exact selections).
    kw = dict(chunk=16, num_splits=3, cmp_programs=64, fuse_combine=fuse, fn=nsa_mod.nsa_decode_tuned)
    check_nsa([9, 100, 170], Hkv=2, G=4, Dk=24, Dv=16, p=SMALL, dtype=torch.bfloat16, tol=2e-2,
              bf16_partials=True, **kw)
    q, gates, layer, tables, seq_lens, _ = make_case([9, 100, 170], 2, 4, 24, 16, SMALL, torch.bfloat16)
    a, b = (nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, num_splits=3,
                                     cmp_programs=64, fuse_combine=fuse, bf16_partials=x) for x in (False, True))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("launch", sorted(DENSE_LAUNCHES))
@pytest.mark.parametrize("G,splits,Dk", [(1, 1, 24), (4, 3, 24), (16, 5, 24), (4, 2, 48), (2, 1, 16)])
def test_dense_paged_decode_matches_reference(G, splits, Dk, launch):
    # Both launches ("ahead": page ids a page early and dk as two dots, e.g. 48 = 32 + 16; and the
    # previous one), ragged lengths, several splits.
    q, gates, layer, tables, seq_lens, _ = make_case(RAGGED, 2, G, Dk, 16, SMALL, seed=G)
    out = dense_mod.dense_paged_decode(q, layer, tables, seq_lens, num_splits=splits, launch=launch)
    assert rel_err(out, reference(q, gates, layer, tables, seq_lens, SMALL, None, dense=True)) < 1e-5
    with pytest.raises(ValueError, match="launch"):
        dense_mod.dense_paged_decode(q, layer, tables, seq_lens, launch="nope")


def test_bad_inputs_raise_clear_errors():
    q, gates, layer, tables, seq_lens, _ = make_case([20], 2, 2, 16, 16, SMALL)
    with pytest.raises(ValueError, match="int32"):
        nsa_mod.nsa_decode(q, gates, layer, tables.long(), seq_lens, SMALL)
    with pytest.raises(ValueError, match="page size"):
        nsa_mod.nsa_decode(q, gates, layer, tables, seq_lens,
                           SparsityParams(block=8, stride=4, select_block=32, num_select=4, window=32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        nsa_mod.nsa_decode(q[:, :3], gates[:, :3], layer, tables, seq_lens, SMALL)


# ----------------------------------------------------------------------------------------- GPU

PAPER = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_paper_shape_half(dtype):
    lens = [1, 31, 64, 65, 700, 4097, 20000, 33000]
    for ring in (False, PAPER.window // PAPER.select_block):
        check_nsa(lens, Hkv=4, G=16, Dk=192, Dv=128, p=PAPER, dtype=dtype, tol=1e-2, device="cuda",
                  ring=ring)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lens", [[65536], [33000, 70]], ids=["batch 1", "batch 2"])
def test_gpu_paper_shape_small_batch_default(lens):
    # Batch 1 and 2 at 4 kv heads take the small-batch compressed tiling (_cmp_tiling).
    check_nsa(lens, Hkv=4, G=16, Dk=192, Dv=128, p=PAPER, device="cuda")
    check_nsa(lens, Hkv=4, G=16, Dk=192, Dv=128, p=PAPER, dtype=torch.bfloat16, tol=1e-2, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G", [1, 4, 16])
def test_gpu_paper_shape_fp32_selection(G):
    # float32 (ieee dots) so the selected blocks can be compared exactly with the reference.
    check_nsa([1, 63, 64, 513, 9000, 16500], Hkv=4, G=G, Dk=192, Dv=128, p=PAPER, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kw", [dict(cmp_warps=8, cmp_stages=2, cmp_split_dk=False),
                                dict(chunk=32, cmp_programs=528, attend_split_dk=True),
                                dict(chunk=32, cmp_programs=528, num_splits=12, fuse_combine=True),
                                dict(fuse_combine=False), dict(topn="sort"),
                                dict(topn="passes"), dict(topn="cand"),
                                dict(topn="cand", chunk=64, cmp_programs=528),
                                dict(carveout=None), dict(carveout=0), dict(cmp_evict=False),
                                dict(num_splits=7),
                                # the fused merge one or four splits a step (the default by Triton release)
                                dict(num_splits=4, fuse_combine=True, merge_chunk=1),
                                dict(num_splits=4, fuse_combine=True, merge_chunk=4),
                                # unpipelined compressed pass (its loads keep the evict-first hint)
                                dict(cmp_stages=1, chunk=32, cmp_programs=528),
                                dict(cmp_stages=1, chunk=64, cmp_warps=8, cmp_programs=264),
                                # values after keys (the default at batch ≥ 3 with PDL), and without
                                dict(values_after_keys=True, score_warps=4),
                                dict(values_after_keys=True, cmp_programs=132, score_warps=2),
                                dict(values_after_keys=True, num_splits=6),
                                dict(values_after_keys=True, chunk=32, cmp_programs=528, fuse_combine=False),
                                dict(values_after_keys=False)])
def test_gpu_paper_shape_launch_variants(kw):
    # The launch configurations the benchmark compares (nsa_decode_tuned); the default is covered
    # above. fp32 so the selected blocks are compared exactly too.
    check_nsa([1, 65, 4097, 20000, 33000], Hkv=4, G=16, Dk=192, Dv=128, p=PAPER, device="cuda",
              fn=nsa_mod.nsa_decode_tuned, **kw)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("bf16_partials", [True, False])
def test_gpu_paper_shape_bf16_partials(fuse, bf16_partials):
    # Partial output rows in bf16 (the default; the knob acts on bf16 inputs only) or fp32, both
    # merges: the bf16 bound holds.
    check_nsa([1, 65, 4097, 20000, 33000], Hkv=4, G=16, Dk=192, Dv=128, p=PAPER, dtype=torch.bfloat16,
              tol=1e-2, device="cuda", fn=nsa_mod.nsa_decode_tuned, bf16_partials=bf16_partials,
              fuse_combine=fuse)


@pytest.mark.gpu
@gpu
def test_gpu_set_carveout_sets_the_function_attribute():
    # The decode step's carveout knob must reach the driver: read the attribute back from the
    # score kernel's compiled functions after calls with different values (other tests in the
    # session may have loaded other variants of it, so the value must be among them).
    import ctypes

    from nsa_kernels._triton_utils import _CARVEOUT_ATTR, _libcuda, set_carveout

    def carveout_of(fn):
        got = ctypes.c_int()
        assert _libcuda().cuFuncGetAttribute(ctypes.byref(got), ctypes.c_int(_CARVEOUT_ATTR),
                                             ctypes.c_void_p(fn)) == 0
        return got.value

    q, gates, layer, tables, seq_lens, _ = make_case([100, 3000], 4, 16, 192, 128, PAPER, torch.bfloat16,
                                                     device="cuda")
    k = nsa_mod._score_kernel
    for want in (0, 37, 100):
        nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, PAPER, carveout=want)
        fns = [c.function for cache in k.device_caches.values() for c in cache[0].values() if c.function]
        assert want in {carveout_of(fn) for fn in fns}
    for want in (0, 37, 100):  # set directly on one function
        set_carveout(type("Launched", (), {"function": fns[0]})(), want)
        assert carveout_of(fns[0]) == want
    set_carveout(None, 100)  # anything without a loaded function (the interpreter's result) is a no-op


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("launch", DENSE_LAUNCHES)
def test_gpu_dense_paper_shape(launch):
    q, gates, layer, tables, seq_lens, _ = make_case([1, 64, 65, 5000, 33000], 4, 16, 192, 128, PAPER,
                                                     torch.bfloat16, device="cuda")
    out = dense_mod.dense_paged_decode(q, layer, tables, seq_lens, launch=launch)
    assert rel_err(out, reference(q, gates, layer, tables, seq_lens, PAPER, None, dense=True)) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_and_replay():
    q, gates, layer, tables, seq_lens, _ = make_case([100, 3000, 9000], 4, 16, 192, 128, PAPER,
                                                     torch.bfloat16, device="cuda")
    fns = {"nsa": lambda: nsa_mod.nsa_decode(q, gates, layer, tables, seq_lens, PAPER),
           "dense": lambda: dense_mod.dense_paged_decode(q, layer, tables, seq_lens)}
    for name, fn in fns.items():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn()
        # New inputs in the same buffers: longer sequences, new queries.
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.tensor([101, 3040, 9001], dtype=torch.int32, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(q, gates, layer, tables, seq_lens, PAPER, None, dense=name == "dense")
        assert rel_err(static_out, ref) < 1e-2, name


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("after_keys", [False, True])
def test_gpu_last_arriving_split_sees_every_split(after_keys):
    # Many splits per group racing on the arrival counters (compressed pass: one 16-entry tile per
    # split; attention: 25 splits, merge fused): an ordering bug would show as a wrong or
    # non-deterministic output, so 50 calls must be bitwise equal and match the reference.
    q, gates, layer, tables, seq_lens, _ = make_case([9000, 33000], 4, 16, 192, 128, PAPER,
                                                     torch.bfloat16, device="cuda")
    fn = lambda: nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, PAPER, chunk=16,  # noqa: E731
                                          cmp_programs=4096, num_splits=25, fuse_combine=True,
                                          values_after_keys=after_keys)
    first = fn()
    for _ in range(50):
        assert torch.equal(fn(), first)
    assert rel_err(first, reference(q, gates, layer, tables, seq_lens, PAPER, None)) < 1e-2
    assert int(nsa_mod._COUNTERS[q.device].abs().sum()) == 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("after_keys", [False, True])
def test_gpu_pdl_chain_equals_plain_launches(after_keys):
    # Programmatic dependent launch: each kernel is launched while the previous one drains and
    # waits for it inside. A chain where every decode reads what the kernel just before it wrote
    # (a torch copy into q, then a decode whose output becomes the next decode's q), replayed from
    # a CUDA graph, must equal plain launches bitwise; a missing wait would read stale q.
    from nsa_kernels._triton_utils import pdl_enabled

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+ and a Triton with launch_pdl")
    q, gates, layer, tables, seq_lens, _ = make_case([700, 9000, 33000], 4, 16, 192, 128, PAPER,
                                                     torch.bfloat16, device="cuda")
    src = torch.randn_like(q)

    def chain(pdl):
        q.copy_(src)
        outs = []
        for _ in range(3):
            o = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, PAPER, pdl=pdl,
                                         values_after_keys=after_keys)
            q[..., :o.shape[-1]].copy_(o * 8)
            outs.append(o)
        return torch.stack(outs)

    plain = chain(False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = chain(True)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, plain)
    assert torch.equal(chain(True), plain)  # eager PDL launches too


def test_timeline_instrumentation_still_applies():
    # scripts/decode_timeline.py stamps a copy of this kernel file by matching anchors in its source;
    # a kernel edit that moves an anchor must fail here, not on the GPU. Without a timer the
    # instrumented copy computes exactly what the kernel does.
    tool = load_script("decode_timeline")
    q, gates, layer, tables, seq_lens, _ = make_case([40, 150], 2, 4, 24, 16, SMALL, seed=5)
    for score_phases in (False, True):  # --score-phases adds stamps inside the score kernel
        mod = tool.instrumented_module(score_phases)
        assert "timer" in mod.nsa_decode_tuned.__code__.co_varnames
        for topn in nsa_mod.TOPN_MODES:
            want = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, topn=topn)
            got = mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, topn=topn)
            assert torch.equal(got, want)
        # The fused merge's stamps (3 splits, merged by the last-arriving one).
        kw = dict(chunk=16, num_splits=3, fuse_combine=True)
        want = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, **kw)
        assert torch.equal(mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, **kw), want)


TOPN_CASES = {
    # name: (lens, Hkv, G, Dk, Dv, p, kwargs)
    "ragged, G=1": (RAGGED, 2, 1, 24, 16, SMALL, dict(chunk=16)),
    "G=16": ([3, 33, 160], 2, 16, 24, 16, SMALL, dict(chunk=16)),
    "window ring": ([2, 31, 32, 47, 200], 2, 4, 32, 16, SMALL, dict(chunk=16, num_splits=3, ring=3)),
    "l > l' (3 blocks a summary)": ([7, 16, 41, 130, 191], 1, 2, 16, 24,
                                    SparsityParams(block=40, stride=8, select_block=16, num_select=4,
                                                   window=32, num_local=1), dict(chunk=16, num_splits=2)),
    "l = d = l', n not a power of two": ([7, 16, 41, 130, 191], 1, 2, 16, 24,
                                         SparsityParams(block=16, stride=16, select_block=16, num_select=3,
                                                        window=16), dict(chunk=16)),
    "n above the table's blocks": ([40, 250, 600], 1, 2, 16, 16,
                                   SparsityParams(block=8, stride=4, select_block=16, num_select=24,
                                                  window=32), dict(chunk=64)),
    "many compressed splits": (RAGGED, 2, 4, 48, 16, SMALL, dict(chunk=16, cmp_programs=64, num_splits=3)),
}


@pytest.mark.parametrize("topn", ["sort", "cand"])
@pytest.mark.parametrize("topk", [True, False], ids=["tl.topk", "tl.sort"])
@pytest.mark.parametrize("case", list(TOPN_CASES))
def test_nsa_decode_sort_topn_matches_reference(case, topk, topn, monkeypatch):
    # The sorting top-n (`topn="sort"`, beside the arg-max passes) must pick the reference's blocks and
    # give its output in every layout the default is tested in — with tl.topk and with the full
    # tl.sort used where a Triton lacks tl.topk (the interpreter reads the module global each call).
    if topk and not hasattr(tl, "topk"):
        pytest.skip("this Triton has no tl.topk")
    monkeypatch.setattr(nsa_mod, "HAS_TOPK", tl.constexpr(topk))
    lens, Hkv, G, Dk, Dv, p, kw = TOPN_CASES[case]
    check_nsa(lens, Hkv, G, Dk, Dv, p, fn=nsa_mod.nsa_decode_tuned, topn=topn, **kw)


@pytest.mark.parametrize("topn", ["passes", "sort", "cand"])
def test_nsa_decode_topn_ties_and_repeat_calls(topn):
    q, gates, layer, tables, seq_lens, _ = make_case([132, 135], 2, 2, 16, 16, SMALL)
    q.zero_()  # every interior block ties: lower block indices must win
    out, sel = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, return_selection=True,
                                        chunk=16, topn=topn)
    want = reference_selection(q, gates, layer, tables, seq_lens, SMALL, None)
    assert [[set(sel[b, h].tolist()) - {-1} for h in range(2)] for b in range(2)] == want
    assert sel[0, 0].tolist() == [0, 7, 8, 1]  # forced blocks first (lower index first), then the tie's winner
    _, sel_default = nsa_mod.nsa_decode(q, gates, layer, tables, seq_lens, SMALL, return_selection=True, chunk=16)
    assert torch.equal(sel, sel_default)  # the same list, in the same order
    again = nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, chunk=16, topn=topn)
    assert torch.equal(again, out)
    assert int(nsa_mod._COUNTERS[q.device].abs().sum()) == 0
    with pytest.raises(ValueError, match="topn"):
        nsa_mod.nsa_decode_tuned(q, gates, layer, tables, seq_lens, SMALL, topn="rank")


def test_set_carveout_is_a_hint_a_refusal_warns_once_and_never_fails(monkeypatch):
    # The carveout is a performance hint: a driver that refuses it (or no libcuda) must not fail
    # the decode step; it warns once per function and value. Calls for an unchanged value, and
    # objects without a loaded function (the interpreter's), make no driver call.
    import nsa_kernels._triton_utils as tu

    calls = []

    class Lib:
        def cuFuncSetAttribute(self, fn, attr, value):
            calls.append((fn.value, attr.value, value.value))
            return 1  # CUDA_ERROR_INVALID_VALUE

    monkeypatch.setattr(tu, "_libcuda", lambda: Lib())
    monkeypatch.setattr(tu, "_carveouts", {})
    launched = type("Launched", (), {"function": 1234})()
    with pytest.warns(RuntimeWarning, match="carveout to 100"):
        tu.set_carveout(launched, 100)
    tu.set_carveout(launched, 100)  # same value: not retried
    tu.set_carveout(type("NotLoaded", (), {"function": None})(), 100)
    tu.set_carveout(None, 100)
    assert calls == [(1234, tu._CARVEOUT_ATTR, 100)]

    def missing():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(tu, "_libcuda", missing)
    with pytest.warns(RuntimeWarning, match="libcuda"):
        tu.set_carveout(launched, 0)
