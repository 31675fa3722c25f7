"""The engine's own attention fast path (dense prompt chunks through SDPA) against the reference."""

from __future__ import annotations

import torch

from nsa_kernels.paged import PagedLayerCache, paged_nsa_attention_ref
from nsa_kernels.reference import SparsityParams
from nsa_serve.engine.attention import dense_prefill_sdpa


class _Inputs:  # the StepInputs fields dense_prefill_sdpa reads
    def __init__(self, block_tables, cu, lens):
        self.block_tables, self.cu_host, self.seq_lens_host = block_tables, cu, lens


def test_dense_prefill_sdpa_matches_the_reference_dense_mode():
    gen = torch.Generator().manual_seed(0)
    P, Hkv, Hq, Dk, Dv, pages = 16, 2, 6, 24, 16, 40
    cache = PagedLayerCache.allocate(pages, Hkv, Dk, Dv, P, 4, dtype=torch.float64)
    for t in (cache.k_cache, cache.v_cache):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64))
    lens, chunks = [37, 70, 9], [5, 33, 9]  # chunk = the last T tokens of each sequence
    perm = torch.randperm(pages, generator=gen)
    tables = torch.zeros(3, 8, dtype=torch.int32)
    used = 0
    for b, L in enumerate(lens):
        n = (L + P - 1) // P
        tables[b, :n] = perm[used:used + n].int()
        used += n
    cu = [0]
    for T in chunks:
        cu.append(cu[-1] + T)
    q = torch.randn(cu[-1], Hq, Dk, generator=gen, dtype=torch.float64)
    p = SparsityParams(block=8, stride=4, select_block=P, num_select=4, window=32)
    want = paged_nsa_attention_ref(q, torch.zeros(cu[-1], Hq, 3, dtype=torch.float64), cache, tables,
                                   torch.tensor(cu), torch.tensor(lens), p, dense=True)
    got = dense_prefill_sdpa(q, cache, _Inputs(tables, cu, lens), 0, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
