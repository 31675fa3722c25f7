"""Block manager: pages, reference counts, rings, and when a page may be shared."""

from __future__ import annotations

import pytest

from nsa_serve.engine.block_manager import BlockManager
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.engine.sequence import Sequence

P, E, TAIL = 16, 4, 4  # tiny preset: l' = 16, d = 4 (4 summaries per page), l − d = 4


def seq(tokens, salt=None):
    return Sequence("r", 0, list(tokens), SamplingParams(cache_salt=salt), 0.0)


def prefilled(bm, tokens, salt=None):
    """A sequence of `tokens` admitted and computed whole (its complete pages registered)."""
    s = seq(tokens, salt)
    assert bm.admit(s, len(tokens))
    computed(bm, s, len(tokens))
    return s


def computed(bm, s, n):
    """Pretend the runner computed the first n tokens (summaries included)."""
    s.num_computed_tokens = n
    bm.register_complete_pages(s)


def test_allocate_and_free_return_every_page():
    bm = BlockManager(10, P, E, TAIL)
    a, b = seq(range(40)), seq(range(100, 120))
    assert bm.allocate(a, 40) and len(a.block_table) == 3
    assert bm.allocate(b, 20) and len(b.block_table) == 2
    assert bm.num_free_pages == 5 and not set(a.block_table) & set(b.block_table)
    assert not bm.allocate(a, 40 + 6 * P)  # too many: nothing changes
    assert len(a.block_table) == 3 and bm.num_free_pages == 5
    bm.free_sequence(a)
    bm.free_sequence(b)
    bm.check_all_free()


def test_independent_kv_sequences_get_private_rings():
    bm = BlockManager(12, P, E, TAIL, win_ring_pages=2, cmp_ring_pages=1, enable_prefix_caching=False)
    s = seq(range(5))
    assert bm.pages_needed(s, 5) == 4
    assert bm.allocate(s, 5)
    assert len(s.win_ring) == 2 and len(s.cmp_ring) == 1 and len(s.block_table) == 1
    assert bm.max_tokens_per_sequence() == 9 * P
    bm.free_sequence(s)
    bm.check_all_free()


def test_a_page_is_cached_only_once_its_summaries_are_complete():
    bm = BlockManager(20, P, E, TAIL)
    tokens = list(range(1000, 1000 + 3 * P + 10))
    a = seq(tokens)
    bm.admit(a, len(tokens))
    computed(bm, a, 2 * P + TAIL - 1)  # page 2's last summary still needs one token
    assert len(a.page_hashes) == 1
    computed(bm, a, 2 * P + TAIL)
    assert len(a.page_hashes) == 2
    computed(bm, a, len(tokens))
    assert len(a.page_hashes) == 3
    # Same prompt: 3 pages found (one token always left to compute).
    b = seq(tokens)
    assert bm.admit(b, len(tokens))
    assert b.num_computed_tokens == 3 * P and b.block_table[:3] == a.block_table[:3]
    assert b.num_summaries == 3 * E
    assert bm.ref_count[a.block_table[0]] == 2
    # Same first 3 pages, different token right after: page 3's summaries do not apply.
    c = seq(tokens[:3 * P] + [7] + tokens[3 * P + 1:])
    assert bm.admit(c, len(tokens)) and c.num_computed_tokens == 2 * P
    # A prompt that *is* exactly the cached pages must still compute its last token.
    d = seq(tokens[:3 * P + TAIL])
    assert bm.admit(d, 100) and d.num_computed_tokens == 3 * P
    for s in (a, b, c, d):
        bm.free_sequence(s)
    bm.check_all_free()


def test_freed_cached_pages_stay_reusable_until_handed_out_again():
    bm = BlockManager(6, P, E, TAIL)
    tokens = list(range(2 * P + 8))
    a = prefilled(bm, tokens)
    cached = a.block_table[:2]
    bm.free_sequence(a)
    assert bm.num_free_pages == 6
    b = seq(tokens)
    assert bm.admit(b, len(tokens)) and b.block_table[:2] == cached
    assert bm.prefix_hits == 2 * P
    bm.free_sequence(b)
    # Fill the whole pool with unrelated pages: the cached content is overwritten and forgotten.
    c = seq(range(500, 500 + 6 * P))
    assert bm.allocate(c, 6 * P)
    bm.free_sequence(c)
    d = seq(tokens)
    assert bm.admit(d, len(tokens)) and d.num_computed_tokens == 0
    bm.free_sequence(d)
    bm.check_all_free()


def test_a_cache_salt_shares_pages_only_with_the_same_salt():
    bm = BlockManager(40, P, E, TAIL)
    tokens = list(range(3 * P + 8))
    owners = {salt: prefilled(bm, tokens, salt) for salt in (None, "tenant-a")}
    # Same tokens, separate chains: neither owner's pages serve the other.
    assert not set(owners[None].block_table) & set(owners["tenant-a"].block_table)
    hits = {}
    for salt in (None, "tenant-a", "tenant-b", "tenant-a "):
        s = seq(tokens, salt)
        assert bm.admit(s, len(tokens))
        hits[salt] = s.block_table[:s.num_computed_tokens // P]
        bm.free_sequence(s)
    assert hits[None] == owners[None].block_table[:3] and hits["tenant-a"] == owners["tenant-a"].block_table[:3]
    assert hits["tenant-b"] == [] and hits["tenant-a "] == []
    for s in owners.values():
        bm.free_sequence(s)
    bm.check_all_free()


def test_reset_prefix_cache_forgets_pages_but_not_their_holders():
    bm = BlockManager(20, P, E, TAIL)
    tokens = list(range(2 * P + 8))
    a = prefilled(bm, tokens)
    kept = list(a.block_table)
    assert bm.reset_prefix_cache() == 2
    b = seq(tokens)
    assert bm.admit(b, len(tokens)) and b.num_computed_tokens == 0
    assert a.block_table == kept and not set(kept) & set(b.block_table)
    computed(bm, b, len(tokens))  # b's pages are cached afresh
    fresh = b.block_table[:2]
    for s in (a, b):
        bm.free_sequence(s)
    c = seq(tokens)
    assert bm.admit(c, len(tokens)) and c.block_table[:2] == fresh
    bm.free_sequence(c)
    bm.check_all_free()


def test_summary_counts_follow_page_ownership():
    bm = BlockManager(8, P, E, TAIL)
    a = seq(range(3 * P))
    bm.allocate(a, 3 * P)
    bm.note_summaries(a, 0, 9)
    assert bm.summaries_stored == 9
    assert [bm.page_summaries[p] for p in a.block_table] == [4, 4, 1]
    bm.free_sequence(a)
    assert bm.summaries_stored == 0


def test_releasing_twice_is_an_error():
    bm = BlockManager(2, P, E, TAIL)
    a = seq(range(4))
    bm.allocate(a, 4)
    page = a.block_table[0]
    bm.free_sequence(a)
    with pytest.raises(RuntimeError):
        bm._release(page)
