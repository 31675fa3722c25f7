"""Block tables as numpy rows, kept between engine steps (the step-input builders' cache)."""

from __future__ import annotations

import numpy as np

from .sequence import Sequence


class TableRows:
    """Block tables as numpy int32 rows, kept between steps and extended as the tables grow.

    A sequence's block table only ever grows by appending pages, or is replaced by a new list
    (freed, preempted, served from the prefix cache): so a cached row made from the same list
    object holds the table's first pages, and only the pages appended since are converted. The
    cache holds the sequences of the last call only (no growth with finished requests)."""

    def __init__(self):
        self._rows: dict[int, tuple[list, np.ndarray, int]] = {}

    def rows(self, seqs: list[Sequence]) -> list[np.ndarray]:
        keep, out = {}, []
        for s in seqs:
            table, n = s.block_table, len(s.block_table)
            cached = self._rows.get(s.seq_id)
            if cached is not None and cached[0] is table and cached[2] <= n:
                _, buf, done = cached
            else:
                buf, done = np.empty(max(16, 2 * n), dtype=np.int32), 0
            if n > buf.shape[0]:
                grown = np.empty(2 * n, dtype=np.int32)
                grown[:done] = buf[:done]
                buf = grown
            if n > done:
                buf[done:n] = table[done:n]
            keep[s.seq_id] = (table, buf, n)
            out.append(buf[:n])
        self._rows = keep
        return out
