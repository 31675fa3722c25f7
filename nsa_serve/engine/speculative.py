"""Speculative decoding: which sequences may speculate, and which drafts a step accepts.

A sequence that may speculate gets up to k draft tokens (ngram.py) appended to its tokens before
scheduling, so its row computes 1 + k tokens: its last sampled token and the drafts. The model's
logits after each of those k + 1 positions are sampled with the sequence's own parameters, as k + 1
rows of one batch. Draft i is accepted while every sample before it equalled its draft; the
tokens emitted are the accepted drafts and the sample after the last of them.

This is exact, not an approximation, for greedy and random sampling alike: every emitted token is
a sample of the model's distribution given the tokens before it, which are the ones emitted. For
a draft d the rule accepts with probability p(d) and otherwise emits a sample of p conditioned on
not d, which is the rejection-sampling rule of speculative sampling (Leviathan et al., 2023) for a
proposer that puts all its mass on d. Greedy rows emit exactly the tokens plain decoding would.

Each position is sampled with its own history: the sampler hides the drafts after a row's
position from its penalties, bad words and min_tokens count (sampler.hidden_drafts), so rows with
those speculate too, and logprobs are each position's own. Rows with a grammar (its matcher would
have to follow every draft) or a seed (its draws would depend on how many drafts the step had room
for, and so on the batch) decode one token a step as before.
The rejected drafts' K/V stay in the pages past the sequence's length, where the next step
overwrites them; summaries over them are dropped and made again (llm_engine._verify_drafts).
"""

from __future__ import annotations

from .sequence import Sequence


def draft_limit(seq: Sequence, max_model_len: int) -> int:
    """How many draft tokens `seq` may verify in its next step: 0 when it may not speculate. All
    k + 1 tokens of a fully accepted row must fit max_tokens and the context."""
    p = seq.params
    if (seq.num_pending or seq.num_draft or seq.num_tokens - seq.num_computed_tokens != 1
            or seq.matcher is not None or p.seed is not None):
        return 0
    limit = max_model_len - seq.num_tokens - 1
    if p.max_tokens is not None:
        limit = min(limit, p.max_tokens - seq.num_output_tokens - 1)
    return limit


def accepted_drafts(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts are accepted: the length of the prefix where sample i equals draft i."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


DECODE, VERIFY, CHUNK = 0, 1, 2  # row kinds, in the order of a step's rows


def row_kind(seq: Sequence, num_new: int, verify_as_decode: bool) -> int:
    """DECODE: one new token. VERIFY: the last sampled token and the sequence's drafts, all of
    them, ending at its last known token (attention takes them as decode rows: model_runner.py).
    CHUNK: the rest."""
    if num_new == 1:
        return DECODE
    if (verify_as_decode and seq.num_draft and num_new == seq.num_draft + 1
            and seq.num_computed_tokens + num_new == seq.num_tokens):
        return VERIFY
    return CHUNK
