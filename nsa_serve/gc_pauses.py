"""Python's garbage collector as a source of latency, and what the server does about it.

A full (generation 2) collection walks every tracked object and holds the GIL while it does, so the
event loop that sends everyone's tokens and the engine thread both stop: with the server's modules
and a model loaded that is ~10^5–10^6 objects, ~0.1–0.2 s on the 2-core CPU. Most of them are made
at start-up and live as long as the process, so `freeze_heap` moves them out of the collector's
reach once start-up is over (vLLM does the same after its warm-up, `freeze_gc_heap`); collections
then walk only what requests allocate. `GCPauses` times each collection, by generation, for the
`nsa:gc_pause_seconds` histogram, so an operator can see whether pauses line up with latency spikes.
"""

from __future__ import annotations

import bisect
import gc
import time

# Pause bucket edges (seconds): a young collection takes microseconds, a full one up to ~1 s.
PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GENERATIONS = 3


def freeze_heap() -> int:
    """Collect once, then exclude every object alive now from later collections (they are still
    freed when their last reference goes; only cycles among them would stay). For a process whose
    start-up objects live as long as it does: the server, not a library caller that builds and drops
    engines. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauses:
    """Durations of the collector's runs, by generation, as cumulative histogram counts.

    A gc callback runs in whichever thread triggered the collection, inside the collector; it only
    does integer and float arithmetic on preallocated lists (no locks, no container allocation), so
    it cannot deadlock against a thread that holds a lock, nor set off another collection. Reads
    (at scrape time) may see one collection half-counted, which a scrape tolerates."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(GENERATIONS)]  # last: +Inf
        self.sums = [0.0] * GENERATIONS
        self._start = 0.0
        self._installed = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        gen = info.get("generation", GENERATIONS - 1)
        if not 0 <= gen < GENERATIONS:
            return
        seconds = time.perf_counter() - self._start
        self.counts[gen][bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
        self.sums[gen] += seconds

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def histogram(self, gen: int) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets as HistogramMetricFamily takes them, sum) for one generation."""
        running, buckets = 0, []
        for edge, n in zip([*(str(e) for e in PAUSE_BUCKETS), "+Inf"], self.counts[gen]):
            running += n
            buckets.append((edge, running))
        return buckets, self.sums[gen]
