"""The collector's pause timer and the start-up heap freeze (nsa_serve/gc_pauses.py)."""

from __future__ import annotations

import gc

from nsa_serve.gc_pauses import PAUSE_BUCKETS, GCPauses, freeze_heap


def test_pauses_are_counted_by_generation_into_cumulative_buckets_while_installed():
    pauses = GCPauses()
    gc.collect()  # not installed: not counted
    assert pauses.histogram(2) == ([(str(e), 0) for e in PAUSE_BUCKETS] + [("+Inf", 0)], 0.0)
    pauses.install()
    pauses.install()  # once only
    try:
        gc.collect(0)
        gc.collect()
        gc.collect()
    finally:
        pauses.remove()
    pauses.remove()
    gc.collect()  # removed: not counted
    buckets, total = pauses.histogram(2)
    assert buckets[-1] == ("+Inf", 2) and total > 0
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
    assert pauses.histogram(0)[0][-1][1] >= 1
    assert sum(pauses.counts[2]) == 2


def test_a_pause_lands_in_the_bucket_its_length_names(monkeypatch):
    import nsa_serve.gc_pauses as mod

    clock = iter([10.0, 10.003])  # a 3 ms collection
    monkeypatch.setattr(mod.time, "perf_counter", lambda: next(clock))
    pauses = GCPauses()
    pauses._callback("start", {"generation": 1})
    pauses._callback("stop", {"generation": 1})
    buckets, total = pauses.histogram(1)
    below = [n for e, n in buckets if e != "+Inf" and float(e) < 0.003]
    above = [n for e, n in buckets if e == "+Inf" or float(e) >= 0.003]
    assert set(below) == {0} and set(above) == {1} and abs(total - 0.003) < 1e-9


def test_freeze_heap_moves_live_objects_out_of_collections():
    try:
        kept = [[] for _ in range(1000)]
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() and frozen >= 1000
        collected = {id(o) for o in gc.get_objects()}  # the collector's generations, not the frozen
        assert not any(id(x) in collected for x in kept)
    finally:
        gc.unfreeze()  # this test process goes on building and dropping engines
    assert gc.get_freeze_count() == 0
