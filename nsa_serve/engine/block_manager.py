"""Pages of the NSA cache: free list, reference counts, rings, chained-hash prefix caching.

Plain Python, no tensors (DESIGN.md §3). A page holds P = l' tokens of raw K/V *and* the
compressed-block summaries whose blocks start in it, so one block table addresses both.

Prefix caching. Page j of a sequence is registered under the chained hash of its tokens once
(a) it is full and (b) every summary that starts in it is written. A summary starting near the end
of page j covers up to l − d tokens of page j+1, so (b) needs the sequence to have computed
(j+1)·P + (l − d) tokens, and a later request may reuse the page only if its own next l − d tokens
equal those the summaries were made from (the page's `tail`); otherwise the summaries would
describe someone else's continuation. Freed pages keep their hash and stay reusable until the free
list hands them out again (least recently freed first; pages without a hash go first of all).
A request's `cache_salt` is the chain's root, so only requests with the same salt share pages.

Independent-K/V checkpoints also give each running sequence two rings of pages (DESIGN.md §3):
the window branch's own K/V for the last w tokens and φ's staging K/V for the last l tokens. Rings
are private and never cached, so prefix caching is off for such models (their window and φ state at
the cut would have to be cached as well).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, summaries_per_page: int, summary_tail: int,
                 win_ring_pages: int = 0, cmp_ring_pages: int = 0, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"the page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.summaries_per_page = summaries_per_page
        self.summary_tail = summary_tail  # l − d: tokens of the next page the last summaries need
        self.win_ring_pages = win_ring_pages
        self.cmp_ring_pages = cmp_ring_pages
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        self.page_key: list[tuple | None] = [None] * num_pages  # (parent hash, tokens, tail) to verify hits
        self.page_summaries = [0] * num_pages  # summaries written into the page
        self.hash_to_page: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_pages))
        self.summaries_stored = 0  # summaries in pages held by sequences (for metrics)
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free)

    @property
    def ring_pages(self) -> int:
        return self.win_ring_pages + self.cmp_ring_pages

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the pool can hold when it runs alone."""
        return max(0, self.num_pages - self.ring_pages) * self.page_size

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New pages `seq` needs so that tokens [0, num_tokens) have a home."""
        need = max(0, self.pages_for(num_tokens) - len(seq.block_table))
        if self.ring_pages and not seq.win_ring and not seq.cmp_ring:
            need += self.ring_pages
        return need

    # -- page life cycle --------------------------------------------------------------------------
    def _take_free(self) -> int:
        page, _ = self.free.popitem(last=False)
        if self.page_hash[page] is not None:  # the cached content is about to be overwritten
            if self.hash_to_page.get(self.page_hash[page]) == page:
                del self.hash_to_page[self.page_hash[page]]
            self.page_hash[page] = None
            self.page_key[page] = None
        self.page_summaries[page] = 0
        self.ref_count[page] = 1
        return page

    def _acquire(self, page: int) -> None:
        """Take a reference to a page found in the prefix cache (it may sit in the free list)."""
        if self.ref_count[page] == 0:
            del self.free[page]
            self.summaries_stored += self.page_summaries[page]
        self.ref_count[page] += 1

    def _release(self, page: int) -> None:
        self.ref_count[page] -= 1
        if self.ref_count[page] < 0:
            raise RuntimeError(f"page {page} released more often than taken")
        if self.ref_count[page] == 0:
            self.summaries_stored -= self.page_summaries[page]
            self.free[page] = None
            if self.page_hash[page] is None:  # nothing worth keeping: hand it out first
                self.free.move_to_end(page, last=False)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for tokens [0, num_tokens) (and its rings). False, changing nothing,
        when the free list is too short."""
        need = self.pages_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        if self.ring_pages and not seq.win_ring and not seq.cmp_ring:
            seq.win_ring = [self._take_free() for _ in range(self.win_ring_pages)]
            seq.cmp_ring = [self._take_free() for _ in range(self.cmp_ring_pages)]
        while len(seq.block_table) < self.pages_for(num_tokens):
            seq.block_table.append(self._take_free())
        return True

    def free_sequence(self, seq: Sequence) -> None:
        # Release the table back to front so the last (least shareable) pages are reused first.
        for page in reversed(seq.block_table):
            self._release(page)
        for page in seq.win_ring + seq.cmp_ring:
            self._release(page)
        seq.block_table, seq.win_ring, seq.cmp_ring = [], [], []

    def note_summaries(self, seq: Sequence, first: int, end: int) -> None:
        """Entries first … end−1 of `seq` were just written (entry i lives in page i // E)."""
        for i in range(first, end):
            self.page_summaries[seq.block_table[i // self.summaries_per_page]] += 1
        self.summaries_stored += max(0, end - first)

    # -- prefix cache -----------------------------------------------------------------------------
    @staticmethod
    def chain_hash(parent, tokens) -> int:
        return hash((parent, tuple(tokens)))

    @staticmethod
    def chain_root(seq: Sequence) -> tuple | None:
        """The first page's parent: None, or the request's cache salt, which then enters every hash
        of the chain and, held in the first page's key, is compared exactly on a hit."""
        salt = seq.params.cache_salt
        return None if salt is None else ("cache_salt", salt)

    def match_prefix(self, tokens: list[int], root: tuple | None = None) -> tuple[list[int], list[int]]:
        """Cached pages (and their hashes) that can serve a prefix of `tokens`, without taking them.

        At least one token is always left to compute: the last prompt token's logits are needed.
        `root`: the chain's first parent (`chain_root`).
        """
        if not self.enable_prefix_caching:
            return [], []
        P, tail = self.page_size, self.summary_tail
        pages, hashes, parent = [], [], root
        j = 0
        while (j + 1) * P <= len(tokens) - 1 and (j + 1) * P + tail <= len(tokens):
            page_tokens = tuple(tokens[j * P:(j + 1) * P])
            h = self.chain_hash(parent, page_tokens)
            page = self.hash_to_page.get(h)
            if page is None:
                break
            key = (parent, page_tokens, tuple(tokens[(j + 1) * P:(j + 1) * P + tail]))
            if self.page_key[page] != key:  # a hash collision, or a different continuation
                break
            pages.append(page)
            hashes.append(h)
            parent = h
            j += 1
        return pages, hashes

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First allocation of a waiting sequence: reuse cached prefix pages, then allocate room for
        `num_new_tokens` more (capped to what is left). Sets seq.num_computed_tokens to the cached
        length. False, changing nothing, when pages run short."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        # Prompt logprobs need every prompt position's logits: such a sequence computes them all
        # (its pages still enter the cache for others).
        hit_pages, hit_hashes = (([], []) if seq.wants_prompt_logprobs
                                 else self.match_prefix(seq.token_ids, self.chain_root(seq)))
        cached = len(hit_pages) * self.page_size
        total = cached + min(num_new_tokens, seq.num_tokens - cached)
        fresh = self.pages_for(total) - len(hit_pages) + self.ring_pages
        reviving = sum(1 for p in hit_pages if self.ref_count[p] == 0)  # leave the free list too
        if fresh + reviving > len(self.free):
            return False
        for page in hit_pages:
            self._acquire(page)
        seq.block_table = list(hit_pages)
        seq.page_hashes = list(hit_hashes)
        seq.num_computed_tokens = cached
        seq.num_summaries = len(hit_pages) * self.summaries_per_page
        if self.enable_prefix_caching and not seq.wants_prompt_logprobs:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
        ok = self.allocate(seq, total)
        assert ok
        return True

    def register_complete_pages(self, seq: Sequence) -> None:
        """Hash every page of `seq` whose tokens and summaries are now complete."""
        P, tail = self.page_size, self.summary_tail
        j = len(seq.page_hashes)
        while (j + 1) * P + tail <= seq.num_computed_tokens and j < len(seq.block_table):
            parent = seq.page_hashes[-1] if seq.page_hashes else self.chain_root(seq)
            page_tokens = tuple(seq.token_ids[j * P:(j + 1) * P])
            h = self.chain_hash(parent, page_tokens)
            seq.page_hashes.append(h)
            page = seq.block_table[j]
            if self.enable_prefix_caching and h not in self.hash_to_page and self.page_hash[page] is None:
                self.hash_to_page[h] = page
                self.page_hash[page] = h
                self.page_key[page] = (parent, page_tokens,
                                       tuple(seq.token_ids[(j + 1) * P:(j + 1) * P + tail]))
            j += 1

    def reset_prefix_cache(self) -> int:
        """Forget every registered page (free or held); the number forgotten. Holders keep their
        pages and hashes; pages they register later chain onto hashes no lookup reaches, which
        only costs those pages' reuse."""
        n = len(self.hash_to_page)
        self.hash_to_page.clear()
        self.page_hash = [None] * self.num_pages
        self.page_key = [None] * self.num_pages
        return n

    def check_all_free(self) -> None:
        """Raise unless every page is back in the free list with no references (tests, shutdown)."""
        held = [p for p in range(self.num_pages) if self.ref_count[p]]
        if held or len(self.free) != self.num_pages:
            raise AssertionError(f"{len(held)} page(s) still referenced, {len(self.free)}/{self.num_pages} free")
