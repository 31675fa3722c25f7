"""The write path (kernels/cache_write.py) equals the paged contract's reference operations."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from nsa_kernels.paged import read_slots, summary_slots, token_slots, write_slots
from nsa_kernels.reference import SparsityParams, compress_blocks, num_compressed

_, cw, _, _ = load_kernels()

P_SMALL = SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_write_slots_and_skips_negative_slots(dtype):
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(7, 3, 16, 24, generator=gen).to(DEVICE, dtype)
    x = torch.randn(5, 3, 24, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(7 * 16, generator=gen)[:5].to(DEVICE)
    want = cache.clone()
    write_slots(want, x, slots)
    got = cache.clone()
    cw.write_kv(got, x, slots.to(torch.int32))
    assert torch.equal(got, want)
    skipped = cache.clone()
    cw.write_kv(skipped, x, torch.full_like(slots, -1))
    assert torch.equal(skipped, cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_pair_equals_two_writes_and_skips_negative_slots(dtype):
    # K and V (dk ≠ dv) of the same tokens in one launch; a view whose token stride is not H·D (as
    # the fused projection's slices are); −1 slots write nothing.
    gen = torch.Generator().manual_seed(2)
    kc = torch.randn(7, 3, 16, 24, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(7, 3, 16, 8, generator=gen).to(DEVICE, dtype)
    kv = torch.randn(5, 3 * 24 + 3 * 8 + 5, generator=gen).to(DEVICE, dtype)
    k, v = kv[:, :72].view(5, 3, 24), kv[:, 72:96].view(5, 3, 8)
    slots = torch.randperm(7 * 16, generator=gen)[:5].to(DEVICE)
    slots[2] = -1
    wk, wv = kc.clone(), vc.clone()
    keep = slots >= 0
    write_slots(wk, k[keep], slots[keep])
    write_slots(wv, v[keep], slots[keep])
    gk, gv = kc.clone(), vc.clone()
    cw.write_kv_pair(gk, gv, k, v, slots)
    assert torch.equal(gk, wk) and torch.equal(gv, wv)
    with pytest.raises(ValueError, match="agree"):
        cw.write_kv_pair(gk, gv, k, v[:4], slots)


def _sequence(length, p, Hkv=2, D=8, ring_pages=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = p.select_block
    n_pages = 40
    k = torch.randn(n_pages, Hkv, P, D, generator=gen).to(DEVICE)
    table = torch.randperm(n_pages, generator=gen)[:12].to(torch.int32).to(DEVICE)
    return k, table


@pytest.mark.parametrize("length", [7, 8, 9, 12, 16, 60, 64, 100])
def test_completed_block_gather_matches_compress_blocks(length):
    p = P_SMALL
    P = p.select_block
    k, table = _sequence(length, p)
    tables = torch.stack([table, table.roll(1)])
    lens = torch.tensor([length, length + 1], dtype=torch.int32, device=DEVICE)
    entry, bslots, sslots = cw.completed_blocks_decode(tables, lens, p)
    for b in range(2):
        L = int(lens[b])
        completes = num_compressed(L, p.block, p.stride) > num_compressed(L - 1, p.block, p.stride)
        assert (int(entry[b]) >= 0) == completes
        if not completes:
            assert int(sslots[b]) == -1
            continue
        i = num_compressed(L, p.block, p.stride) - 1
        assert int(entry[b]) == i
        seq = read_slots(k, token_slots(tables[b], torch.arange(L, device=DEVICE), P))
        want = compress_blocks(seq, p.block, p.stride)[i]  # [Hkv, l, D]
        got = cw.gather_blocks(k, bslots[b:b + 1])[0]
        assert torch.equal(got, want)
        assert int(sslots[b]) == int(summary_slots(tables[b], torch.tensor([i], device=DEVICE), p.stride, P))


def test_ring_gather_and_fused_mean_summaries():
    # Independent K/V: the compression branch's raw tokens live in a ring of P·ceil(l/P) tokens.
    p = SparsityParams(block=32, stride=16, select_block=16, num_select=4, window=32)
    P, E = p.select_block, p.select_block // p.stride
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(30, 2, P, 8, generator=gen).to(DEVICE)
    v = torch.randn(30, 2, P, 4, generator=gen).to(DEVICE)
    kc = torch.randn(30, 2, E, 8, generator=gen).to(DEVICE)
    vc = torch.randn(30, 2, E, 4, generator=gen).to(DEVICE)
    tables = torch.randperm(30, generator=gen)[:20].view(2, 10).to(torch.int32).to(DEVICE)
    rings = torch.tensor([[25, 26], [27, 28]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([80, 64], dtype=torch.int32, device=DEVICE)  # both complete entry 3
    entry, bslots, sslots = cw.completed_blocks_decode(tables, lens, p, ring_tables=rings)
    assert entry.tolist() == [(80 - 32) // 16, (64 - 32) // 16]
    for b in range(2):
        pos = torch.arange(int(entry[b]) * p.stride, int(entry[b]) * p.stride + p.block, device=DEVICE)
        assert torch.equal(bslots[b], token_slots(rings[b], pos, P, ring=P * 2))
    want_k, want_v = kc.clone(), vc.clone()
    write_slots(want_k, read_slots(k, bslots.flatten()).view(2, p.block, 2, 8).mean(1), sslots)
    write_slots(want_v, read_slots(v, bslots.flatten()).view(2, p.block, 2, 4).mean(1), sslots)
    cw.write_mean_summaries(k, v, kc, vc, bslots, sslots)
    torch.testing.assert_close(kc, want_k)
    torch.testing.assert_close(vc, want_v)
    # Through gather_blocks + any φ (here mean in torch) + write_kv: the same summaries.
    kc2 = torch.zeros_like(kc)
    cw.write_kv(kc2, cw.gather_blocks(k, bslots).mean(2), sslots)
    torch.testing.assert_close(read_slots(kc2, sslots), read_slots(want_k, sslots))


@pytest.mark.parametrize("dk,dv", [(24, 8), (8, 24), (16, 16)])
def test_gather_block_pair_equals_two_gathers_zero_padded(dk, dv):
    # φ's fused input: K and V blocks in one launch, each token's row padded to max(dk, dv), rows
    # of slot −1 (no block completed) zero; the PyTorch twin (the engine's CPU path) the same.
    from nsa_kernels.paged import gather_block_pair_reference

    gen = torch.Generator().manual_seed(5)
    P, lb, H = 16, 8, 3
    k = torch.randn(9, H, P, dk, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn(9, H, P, dv, generator=gen).to(DEVICE, torch.bfloat16)
    slots = torch.randperm(9 * P, generator=gen)[:4 * lb].view(4, lb)
    slots[2] = -1
    slots = slots.to(DEVICE)
    dm = max(dk, dv)
    want = torch.zeros(2, 4 * H, lb * dm, dtype=torch.bfloat16, device=DEVICE)
    for i, (cache, d) in enumerate(((k, dk), (v, dv))):
        blocks = cw.gather_blocks(cache, slots)  # [4, H, lb, d], zero rows where slot −1
        want[i].view(4, H, lb, dm)[..., :d] = blocks
    got = cw.gather_block_pair(k, v, slots.to(torch.int32))
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(gather_block_pair_reference(k, v, slots), want)
    assert not want[:, 2 * H:3 * H].any()
