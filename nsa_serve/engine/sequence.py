"""A request's token stream and its place in the engine: plain data, no tensors.

A request with `n > 1` runs as n `Sequence`s sharing the prompt. The scheduler moves sequences
between WAITING and RUNNING; the block manager fills their page tables; the model runner reads
`token_ids`, `num_computed_tokens` and the tables; the engine appends sampled tokens.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .protocol import SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)  # identity semantics: sequences live in lists and sets by object
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    # Cache state (reset by preemption: recompute from scratch, maybe with prefix hits).
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_summaries: int = 0  # compressed entries written (or inherited through the prefix cache)
    block_table: list[int] = field(default_factory=list)  # page j ↔ tokens [j·P, (j+1)·P)
    win_ring: list[int] = field(default_factory=list)  # independent K/V only: window branch ring
    cmp_ring: list[int] = field(default_factory=list)  # independent K/V only: φ's staging ring
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of pages registered so far
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    # Async scheduling: tokens sampled on the device but not yet read back. They count in
    # `num_tokens` (the scheduler feeds them next) but are not in `token_ids` yet.
    num_pending: int = 0
    # Speculative decoding: draft tokens appended to `token_ids` for one step (they count in
    # `num_tokens`, so the scheduler gives the row 1 + drafts tokens), removed before the step's
    # tokens are appended (speculative.py); and the tokens as a numpy buffer for the n-gram lookup.
    num_draft: int = 0
    token_buffer: object = None
    # Output state.
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    generator: object = None  # torch.Generator for seeded sampling (reproducible whatever the batch)
    matcher: object = None  # structured output: llguidance matcher over the tokens sampled so far
    bad_words: tuple = ()  # params.bad_words as token sequences (bad_words.py), shared by the n

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The request asked for prompt logprobs and this is the completion that computes them."""
        return self.params.prompt_logprobs is not None and self.index == 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while the tokens still to compute are more than the one a decode step feeds."""
        return self.num_tokens - self.num_computed_tokens > 1

    def drop_drafts(self, keep: int = 0) -> None:
        """Remove all but the first `keep` draft tokens."""
        if self.num_draft > keep:
            del self.token_ids[len(self.token_ids) - self.num_draft + keep:]
            self.num_draft = keep

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the cache is dropped; prompt and output so far are kept."""
        self.drop_drafts()
        self.num_computed_tokens = 0
        self.num_summaries = 0
        self.block_table = []
        self.win_ring = []
        self.cmp_ring = []
        self.page_hashes = []
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
