"""`nsa_kernels.nsa_sdpa.paged_nsa_prefill_sdpa` (the engine's prompt-chunk attention where no Triton
kernel runs) equals the paged reference: ragged batches, chunks continuing a sequence, single-token
chunks, group sizes 1 / 4, shared and independent (ring) K/V. The attention function itself is tested
against the reference in tests/test_train_fast_attention.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_prefill import SMALL, Seq, build_cache

from nsa_kernels.nsa_sdpa import paged_nsa_prefill_sdpa
from nsa_kernels.paged import paged_nsa_attention_ref


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("independent", [False, True])
def test_paged_prefill_sdpa_equals_the_reference(Hq, Hkv, independent):
    gen = torch.Generator().manual_seed(Hq * 10 + independent)
    lens, chunks = [37, 100, 150, 7], [37, 20, 1, 7]  # whole prompt, continuation, one token, < l
    seqs = [Seq(L, Hkv, 8, 6, SMALL, independent, gen, torch.float64) for L in lens]
    ring = math.ceil((SMALL.window + max(chunks) - 1) / SMALL.select_block) if independent else None
    layer, bt, wt = build_cache(seqs, lens, SMALL, torch.float64, "cpu", gen, ring)
    T = sum(chunks)
    q = torch.randn(T, Hq, 8, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, Hq, 3, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = paged_nsa_prefill_sdpa(q, gates, layer, bt, cu, sl, SMALL, win_tables=wt)
    want = paged_nsa_attention_ref(q, gates, layer, bt, cu, sl, SMALL, win_tables=wt)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
