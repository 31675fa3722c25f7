"""A periodic line of engine statistics in the server log (vLLM's LoggingStatLogger), for operators
who read logs rather than dashboards:

    prompt 1834.2 tok/s, generation 412.7 tok/s, running 12 reqs, waiting 0 reqs, KV cache 37.5%,
    prefix cache hits 61.0%, NSA decode read 9.1% of dense, preemptions 0, failed steps 0

and, in an interval where speculative decoding verified drafts, ", draft acceptance 64.0%, mean
acceptance length 3.56" (accepted / draft tokens; 1 + accepted per verifying row).
Throughputs and the hit rate are over the interval; the other fields are the engine's state now (or
its totals). Lines are at INFO while the engine works and once when it falls idle, then at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ..engine.protocol import EngineStats

log = logging.getLogger("nsa_serve.stats")


class StatsLog:
    def __init__(self, stats: Callable[[], EngineStats], clock: Callable[[], float] = time.perf_counter):
        self._stats, self._clock = stats, clock
        self._last = stats()
        self._last_t = clock()
        self._was_busy = False

    def line(self) -> tuple[int, str]:
        """The log level and text for the interval since the previous call."""
        now, s = self._clock(), self._stats()
        dt, p = max(now - self._last_t, 1e-9), self._last
        prompt = (s.prompt_tokens_total - p.prompt_tokens_total) / dt
        gen = (s.generation_tokens_total - p.generation_tokens_total) / dt
        queries = s.prefix_cache_queries_total - p.prefix_cache_queries_total
        hits = s.prefix_cache_hits_total - p.prefix_cache_hits_total
        dense = s.kv_tokens_dense_total - p.kv_tokens_dense_total
        read = s.kv_tokens_read_total - p.kv_tokens_read_total
        busy = bool(prompt or gen or s.num_running or s.num_waiting)
        text = (f"prompt {prompt:.1f} tok/s, generation {gen:.1f} tok/s, running {s.num_running} reqs, "
                f"waiting {s.num_waiting} reqs, KV cache {100 * s.kv_cache_usage:.1f}%, "
                f"prefix cache hits {_percent(hits, queries)}, NSA decode read {_percent(read, dense)} of dense, "
                f"preemptions {s.num_preemptions_total}, failed steps {s.num_failed_steps_total}")
        drafts = s.spec_decode_num_drafts_total - p.spec_decode_num_drafts_total
        if drafts:  # speculative decoding worked this interval: vLLM's two summary numbers
            proposed = s.spec_decode_num_draft_tokens_total - p.spec_decode_num_draft_tokens_total
            accepted = s.spec_decode_num_accepted_tokens_total - p.spec_decode_num_accepted_tokens_total
            text += (f", draft acceptance {_percent(accepted, proposed)}, "
                     f"mean acceptance length {1 + accepted / drafts:.2f}")
        level = logging.INFO if busy or self._was_busy else logging.DEBUG
        self._last, self._last_t, self._was_busy = s, now, busy
        return level, text

    async def run(self, interval_s: float) -> None:
        """Log a line every `interval_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                level, text = self.line()
            except Exception:  # statistics must never take the server down
                log.exception("engine statistics unavailable")
                continue
            log.log(level, text)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"
