"""scripts/selection_overlap.py: the page-read counts it prints (docs/benchmarks/prefill.md, plan)
must be the union sizes of real selections, with the forced blocks left out."""

import torch

from nsa_kernels.nsa_sdpa import selection_scores
from nsa_kernels.reference import SparsityParams, num_compressed, num_select_blocks, select_blocks
from script_helpers import load_script


def test_tile_reads_counts_unions():
    m = load_script("selection_overlap")
    sel = torch.zeros(1, 4, 8, dtype=torch.bool)
    sel[0, 0, [2, 3]] = sel[0, 1, [2, 3]] = True  # queries 0 and 1 share both pages
    sel[0, 2, [3, 4]] = sel[0, 3, [3, 4]] = True  # queries 2 and 3 too; page 3 is everyone's
    assert m.tile_reads(sel, 1) == (2.0, 2.0)
    assert m.tile_reads(sel, 2) == (2.0, 1.0)  # two pages a tile of two
    assert m.tile_reads(sel, 4) == (2.0, 0.75)  # pages 2, 3, 4 for four queries


def test_selections_are_the_reference_without_forced_blocks():
    m = load_script("selection_overlap")
    torch.manual_seed(0)
    p = SparsityParams(block=8, stride=4, select_block=16, num_select=4, num_init=1, num_local=1, window=32)
    T, Hq, Hkv, D = 150, 4, 2, 16
    q = torch.randn(T, Hq, D)
    kc = torch.randn(num_compressed(T, p.block, p.stride), Hkv, D)
    got = m.selections(q, kc, p, D ** -0.5, chunk=40)  # query chunks must not change the answer
    N, NB = kc.shape[0], num_select_blocks(T, p.select_block)
    pos = torch.arange(T)
    visible = (torch.arange(N)[None, :] * p.stride + p.block - 1) <= pos[:, None]
    want = select_blocks(selection_scores(q[None], kc[None], visible, NB, p, D ** -0.5)[0], pos, p)
    j = torch.arange(NB)
    cur = (pos // p.select_block)[:, None]
    forced = (j[None, :] < p.num_init) | (j[None, :] > cur - p.num_local)
    assert torch.equal(got, want & ~forced[None])
    # Past the forced blocks, a query with enough visible blocks has n − forced of them chosen.
    late = pos >= (p.num_select + 1) * p.select_block
    assert bool((got[:, late].sum(-1) == p.num_select - p.num_init - p.num_local).all())
