"""TableRows: block tables as cached numpy rows must always equal the sequences' current tables."""

from __future__ import annotations

import numpy as np

from nsa_serve.engine.table_rows import TableRows


class _Seq:
    def __init__(self, seq_id, table):
        self.seq_id, self.block_table = seq_id, table


def test_rows_follow_appends_replacements_and_reused_ids():
    a, b = _Seq(1, [5, 6]), _Seq(2, list(range(40)))
    tr = TableRows()
    for step in range(60):
        if step % 7 == 3:
            a.block_table.append(100 + step)  # grows in place: only the new pages are converted
        if step == 20:
            a.block_table = [9]  # replaced (preempted, or a prefix-cache hit): rebuilt
        if step == 30:
            b = _Seq(2, [1, 2, 3])  # a new sequence under a finished one's id
        rows = tr.rows([a, b])
        assert [r.tolist() for r in rows] == [a.block_table, b.block_table]
        assert all(r.dtype == np.int32 for r in rows)
    assert len(tr.rows([b])) == 1 and set(tr._rows) == {2}  # only the last call's sequences are kept
