"""Who runs this step, and how many tokens each: continuous batching with chunked prefill.

No tensors. Every step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running sequences go first (one decode token each, or the next chunk of a prompt
that is still being prefilled), then waiting ones are admitted while budget and pages last. No
sequence gets more than `long_prefill_token_threshold` prompt tokens per step, so a 128k prompt is
spread over many steps and decodes of other requests keep flowing between its chunks.

A request's n > 1 completions share its prompt: the others are admitted once the first has
prefilled it, so they find its pages in the prefix cache instead of computing it again.

When pages run out, the least important running sequence is preempted by recompute: its pages are
freed and it waits again at the front, keeping its prompt and output so far (its own pages may
come back through the prefix cache). Policies: "fcfs" (arrival order) and "priority" (lower
`priority` value first, then arrival; preemption takes the worst priority first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int, policy: str = "fcfs"):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {policy!r}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_cap = long_prefill_token_threshold
        self.policy = policy
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------------
    def _order_key(self, seq: Sequence):
        if self.policy == "priority":
            return (seq.priority, seq.arrival_time, seq.seq_id)
        return (seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of the request; their pages go back. Returns those removed."""
        gone = [s for s in self.waiting + self.running if s.request_id == request_id]
        for seq in gone:
            self.finish(seq)
        return gone

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def recompute(self, seq: Sequence) -> None:
        """Send a running sequence back to wait, its cache dropped, as a preemption does: the
        engine's way out when a failed step left its cache in a state a retry cannot use."""
        self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_sequence(seq)
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.num_preemptions += 1

    def _awaits_sibling(self, seq: Sequence, prefilling: set[str]) -> bool:
        """A request's other completions (n > 1) wait while one of them prefills the shared prompt,
        then find its pages in the prefix cache: the prompt is computed once, not n times."""
        return (self.bm.enable_prefix_caching and seq.index > 0 and seq.num_preemptions == 0
                and seq.request_id in prefilling)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self.running.sort(key=self._order_key)
        self.waiting.sort(key=self._order_key)

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, self.chunk_cap, budget)
            if n <= 0:  # nothing to compute (cannot happen for a live sequence; be safe)
                i += 1
                continue
            while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                if seq.num_draft:  # speculation never preempts anyone: its drafts go first
                    seq.drop_drafts()
                    n = min(n, seq.num_tokens - seq.num_computed_tokens)
                    continue
                victim = self.running[-1]  # least important: the list is sorted
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        # Admit waiting sequences only when nobody was pushed out this step (else they would
        # just take the pages back from the ones preempted).
        prefilling = {s.request_id for s in self.running if s.num_computed_tokens < s.num_prompt_tokens}
        j = 0
        while (j < len(self.waiting) and not batch.preempted and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[j]
            if self._awaits_sibling(seq, prefilling):
                j += 1
                continue
            n = min(seq.num_tokens, self.chunk_cap, budget)
            if not self.bm.admit(seq, n):
                break
            # Tokens served by the prefix cache need no compute; the chunk starts after them.
            n = min(seq.num_tokens - seq.num_computed_tokens, self.chunk_cap, budget)
            self.waiting.pop(j)
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                prefilling.add(seq.request_id)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch
