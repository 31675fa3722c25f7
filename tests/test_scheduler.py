"""Scheduler: token budget, sequence cap, chunked prefill, policies, preemption, abort (no model)."""

from __future__ import annotations

import pytest

from nsa_serve.engine.block_manager import BlockManager
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.engine.scheduler import Scheduler
from nsa_serve.engine.sequence import Sequence, SequenceStatus

P = 16


def make(num_pages=64, max_seqs=8, budget=64, cap=24, policy="fcfs"):
    bm = BlockManager(num_pages, P, 4, 4)
    return Scheduler(bm, max_seqs, budget, cap, policy), bm


def add(sched, n_tokens, t, rid=None, priority=0):
    s = Sequence(rid or f"r{t}", 0, list(range(10, 10 + n_tokens)), SamplingParams(), float(t), priority)
    sched.add(s)
    return s


def complete(batch, token=5):
    """What the engine does after a step: tokens computed, a sampled token appended."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(token)


def test_budget_chunk_cap_and_sequence_cap():
    sched, _ = make(budget=64, cap=24, max_seqs=3)
    long_, short1, short2, short3 = add(sched, 100, 0), add(sched, 5, 1), add(sched, 7, 2), add(sched, 3, 3)
    b = sched.schedule()
    assert b.seqs == [long_, short1, short2] and b.num_new_tokens == [24, 5, 7]  # cap 3 sequences
    complete(b)
    b = sched.schedule()
    # Running first: decodes of the short ones and the long prompt's next chunk, then no room (3 seqs).
    assert dict(zip(b.seqs, b.num_new_tokens)) == {long_: 24, short1: 1, short2: 1}
    assert b.num_tokens <= 64 and short3.status is SequenceStatus.WAITING


def test_a_long_prompt_does_not_starve_decodes():
    sched, _ = make(budget=32, cap=16)
    talker = add(sched, 4, 0)
    complete(sched.schedule())
    add(sched, 1000, 1)
    for _ in range(10):
        b = sched.schedule()
        assert talker in b.seqs and b.num_tokens <= 32
        complete(b)


def test_priority_policy_orders_waiting_requests():
    sched, _ = make(max_seqs=1, policy="priority")
    low, high = add(sched, 4, 0, "low", priority=5), add(sched, 4, 1, "high", priority=-1)
    assert sched.schedule().seqs == [high]
    fcfs, _ = make(max_seqs=1)
    first = add(fcfs, 4, 0, priority=5)
    add(fcfs, 4, 1, priority=-1)
    assert fcfs.schedule().seqs == [first]
    assert low.status is SequenceStatus.WAITING


def test_out_of_pages_preempts_the_latest_by_recompute():
    sched, bm = make(num_pages=4, budget=200, cap=200)
    a, b = add(sched, 2 * P, 0), add(sched, 2 * P, 1)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and bm.num_free_pages == 0
    complete(batch)
    # Both need a third page for their next token: b (the latest) is pushed out, a goes on.
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert b.num_tokens == 2 * P + 1 and sched.num_preemptions == 1  # its sampled token is kept
    sched.abort(a.request_id)
    assert bm.num_free_pages == 4
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [2 * P + 1]


def test_abort_frees_waiting_and_running_sequences():
    sched, bm = make()
    a, b = add(sched, 40, 0), add(sched, 40, 1)
    sched.schedule()
    c = add(sched, 10, 2)
    for s in (a, b, c):
        sched.abort(s.request_id)
        assert s.status is SequenceStatus.FINISHED
    assert not sched.has_work()
    bm.check_all_free()


def test_step_budget_and_chunk_defaults_depend_on_the_device():
    # None (the defaults): 8192 tokens a step in chunks up to the whole budget on CUDA (eager
    # prefill steps are host-bound in small chunks); 2048 a step in chunks of 512 elsewhere. An
    # explicit value always wins, and the chunk never exceeds the budget.
    from nsa_serve.engine.args import EngineArgs

    def pair(a, dev):
        r = a.resolved(dev)
        return r.max_num_batched_tokens, r.long_prefill_token_threshold

    a = EngineArgs()
    assert (a.max_num_batched_tokens, a.long_prefill_token_threshold) == (None, None)
    assert pair(a, "cuda") == (8192, 8192)
    assert pair(a, "cpu") == (2048, 512)
    assert pair(EngineArgs(max_num_batched_tokens=2048), "cuda") == (2048, 2048)
    assert pair(EngineArgs(max_num_batched_tokens=256), "cpu") == (256, 256)
    assert pair(EngineArgs(long_prefill_token_threshold=100), "cuda") == (8192, 100)
    assert pair(EngineArgs(long_prefill_token_threshold=100), "cpu") == (2048, 100)
    assert pair(EngineArgs(max_num_batched_tokens=64, long_prefill_token_threshold=100), "cpu") == (64, 64)
    # Independent K/V: each sequence's window ring holds w + chunk - 1 tokens, so CUDA chunks stop at 2048.
    assert EngineArgs().resolved("cuda", shared_kv=False).long_prefill_token_threshold == 2048
    assert EngineArgs(max_num_batched_tokens=1024).resolved("cuda", shared_kv=False).long_prefill_token_threshold == 1024
    assert EngineArgs(long_prefill_token_threshold=4096).resolved("cuda", shared_kv=False).long_prefill_token_threshold == 4096
    assert EngineArgs().resolved("cpu", shared_kv=False).long_prefill_token_threshold == 512
    assert a.resolved("cuda").max_num_seqs == a.max_num_seqs and a.max_num_batched_tokens is None  # a copy
    a.validate()
    for name in ("long_prefill_token_threshold", "max_num_batched_tokens"):
        with pytest.raises(ValueError, match=name):
            EngineArgs(**{name: 0}).validate()


def test_engine_schedules_with_the_device_default_chunk():
    from engine_helpers import make_engine

    engine = make_engine(long_prefill_token_threshold=None, max_num_batched_tokens=None)
    assert engine.chunk_cap == engine.scheduler.chunk_cap == 512
    assert engine.args.max_num_batched_tokens == engine.scheduler.max_num_batched_tokens == 2048
    prompt = list(range(3, 3 + 700))
    engine.add_request("long", prompt, SamplingParams(max_tokens=1, temperature=0))
    engine.step()  # the first chunk: 512 of the 700 prompt tokens
    assert engine.requests["long"].completions[0].seq.num_computed_tokens == 512
    while engine.has_unfinished_requests():
        engine.step()
