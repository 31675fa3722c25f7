"""The engine's own attention fast path (dense prompt chunks through SDPA) against the reference."""

from __future__ import annotations

import pytest
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_prefill_sdpa_on_the_gpu_at_the_paper_shape(dtype):
    """The cuDNN path (prefix folded per kv head + causal self part, merged) against the reference
    in float32, at the paper's head shape, ragged chunks, a shuffled page table."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    P, Hkv, Hq, Dk, Dv = 64, 4, 64, 192, 128
    lens, chunks = [3000, 700, 5000], [1000, 700, 64]
    need = [(L + P - 1) // P for L in lens]
    pages = sum(need) + 1
    cache = PagedLayerCache.allocate(pages, Hkv, Dk, Dv, P, 16, dtype=dtype, device=dev)
    cache.k_cache.normal_(generator=gen)
    cache.v_cache.normal_(generator=gen)
    perm = torch.randperm(pages, generator=gen, device=dev).int()
    tables = torch.zeros(3, max(need), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    cu = [0]
    for T in chunks:
        cu.append(cu[-1] + T)
    q = torch.randn(cu[-1], Hq, Dk, generator=gen, device=dev).to(dtype)
    p = SparsityParams(block=32, stride=16, select_block=P, num_select=16, window=512)
    ref_cache = PagedLayerCache.allocate(pages, Hkv, Dk, Dv, P, 16, dtype=torch.float32, device=dev)
    ref_cache.k_cache.copy_(cache.k_cache)
    ref_cache.v_cache.copy_(cache.v_cache)
    want = paged_nsa_attention_ref(q.float(), torch.zeros(cu[-1], Hq, 3, device=dev), ref_cache, tables,
                                   torch.tensor(cu, device=dev), torch.tensor(lens, device=dev), p, dense=True)
    got = dense_prefill_sdpa(q, cache, _Inputs(tables, cu, lens), 0, 3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
