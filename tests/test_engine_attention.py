"""The engine's own attention fast path (dense prompt chunks through torch's fused attention) against
the reference."""

from __future__ import annotations

import pytest
import torch

from nsa_kernels.paged import PagedLayerCache, paged_nsa_attention_ref
from nsa_kernels.reference import SparsityParams
from nsa_serve.engine import attention
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
    lens, chunks = [37, 70, 9, 20], [5, 33, 9, 1]  # chunk = the last T tokens of each sequence
    perm = torch.randperm(pages, generator=gen)
    tables = torch.zeros(len(lens), 8, dtype=torch.int32)
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
    got = dense_prefill_sdpa(q, cache, _Inputs(tables, cu, lens), 0, len(lens))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cudnn", "efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 64, 192, 128), (2, 8, 64, 64), (2, 4, 32, 32)],
                         ids=["paper", "bundled", "tiny"])
def test_dense_prefill_sdpa_on_the_gpu(dtype, shape, route, monkeypatch):
    """The fused path (prefix folded per kv head + causal self part, merged) against the reference
    in float32: the paper's head shape, the bundled model's and the tests' tiny one; ragged chunks
    (5 and 1 rows too, as speculation's verify steps and one-token chunks have), a shuffled page
    table. `cudnn`: torch's cuDNN attention, which must not have refused the shape on this GPU;
    `efficient`: the memory-efficient kernel that takes over where cuDNN refuses."""
    if route == "efficient":
        monkeypatch.setattr(attention, "_use_cudnn", lambda key: False)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    P, (Hkv, Hq, Dk, Dv) = 64, shape
    lens, chunks = [3000, 700, 5000, 1203, 77], [1000, 700, 64, 5, 1]
    need = [(L + P - 1) // P for L in lens]
    pages = sum(need) + 1
    cache = PagedLayerCache.allocate(pages, Hkv, Dk, Dv, P, 16, dtype=dtype, device=dev)
    cache.k_cache.normal_(generator=gen)
    cache.v_cache.normal_(generator=gen)
    perm = torch.randperm(pages, generator=gen, device=dev).int()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=dev)
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
    got = dense_prefill_sdpa(q, cache, _Inputs(tables, cu, lens), 0, len(lens))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    if route == "cudnn":
        assert not attention._cudnn_refused, attention._cudnn_refused
