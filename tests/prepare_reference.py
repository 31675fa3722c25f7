"""The engine's step-input builder as plain Python loops over tokens (its first version), kept as
the slow, obviously-correct twin of `ModelRunner.prepare`, which builds the same tensors with
vectorised ops. tests/test_engine_prepare.py compares the two on every step of mixed workloads."""

from __future__ import annotations

import torch

from nsa_kernels.reference import num_compressed
from nsa_serve.engine.model_runner import StepInputs


FIELDS = ("num_new", "num_seqs", "num_decode", "input_ids", "positions", "slots", "block_tables", "seq_lens",
          "cu_seqlens_q", "cu_host", "seq_lens_host", "summary_old_slots", "entry_src", "entry_slots",
          "new_entries", "logits_rows", "win_tables", "win_write_rows", "win_write_slots", "cmp_write_rows",
          "cmp_write_slots")


def assert_same(got, want, page_size: int | None = None):
    """`got` (ModelRunner.prepare's) equals `want` (the twin's). A piecewise step (got.piecewise
    set) leaves the inputs only the eager step reads unmade (None); the padded lengths and tables
    of its decode rows' graphs are compared with the twin's instead (their tables up to each row's
    last page: `page_size` tokens a page)."""
    assert [id(s) for s in got.seqs] == [id(s) for s in want.seqs]
    assert [id(s) for s in got.sample_seqs] == [id(s) for s in want.sample_seqs]
    if got.piecewise_decode is not None:
        nd = got.num_decode
        lens = got.piecewise_decode["lens"].cpu()
        assert lens[:nd].tolist() == want.seq_lens_host[:nd] and set(lens[nd:].tolist()) <= {1}
        tables = got.piecewise_decode["tables"].cpu()
        for r, n in enumerate(want.seq_lens_host[:nd]):
            pages = -(-n // page_size)
            assert torch.equal(tables[r, :pages], want.block_tables[r, :pages].cpu())
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        if a is None and got.piecewise is not None:
            continue
        if torch.is_tensor(b):
            assert torch.is_tensor(a) and a.dtype == b.dtype, f
            assert torch.equal(a, b.reshape(a.shape)) and a.numel() == b.numel(), f
        else:
            assert a == b, f


def prepare_reference(self, seqs, num_new):
    """ModelRunner.prepare as plain loops over tokens (the engine's first version): the
    obviously-correct twin of the vectorised one. `self` is the ModelRunner."""
    P, E, d, l = self.P, self.E, self.cfg.cmp_stride, self.cfg.cmp_block

    def kind(b):  # 0 decode, 1 verifying all of its drafts, 2 prompt chunk
        s, T = seqs[b], num_new[b]
        if T == 1:
            return 0
        verifying = s.num_draft and T == s.num_draft + 1 and s.num_computed_tokens + T == s.num_tokens
        return 1 if self.verify_as_decode and verifying else 2

    order = sorted(range(len(seqs)), key=kind)  # stable: decode rows, verifying rows, chunks
    kinds = [kind(b) for b in order]
    seqs = [seqs[b] for b in order]
    num_new = [num_new[b] for b in order]
    num_decode = kinds.count(0)
    # Attention's rows: one per decode row, one per token of a verifying row (its length up to that
    # token), one per chunk — unless a piecewise step's decode graphs hold fewer queries.
    pw = self.piecewise if self.piecewise is not None and self.piecewise.eligible(sum(num_new)) else None
    queries = sum(T for T, k in zip(num_new, kinds) if k < 2)
    expand = 1 in kinds and not (pw is not None and pw.decode_rows is not None and queries > pw.decode_rows.max_rows)
    att_seq, att_lens, att_cu = [], [], [0]
    ids, pos, slots, cu, lens = [], [], [], [0], []
    old_slots, entry_src, entry_slots, new_entries = [], [], [], []
    logits_rows, sample_seqs = [], []
    win_rows, win_slots, cmp_rows, cmp_slots = [], [], [], []
    for b, (seq, T) in enumerate(zip(seqs, num_new)):
        start, L = seq.num_computed_tokens, seq.num_computed_tokens + T
        row0 = cu[-1]
        table = seq.block_table
        ids.extend(seq.token_ids[start:L])
        pos.extend(range(start, L))
        slots.extend(table[t // P] * P + t % P for t in range(start, L))
        cu.append(row0 + T)
        lens.append(L)
        if expand and kinds[b] == 1:
            for t in range(start, L):
                att_seq.append(b)
                att_lens.append(t + 1)
                att_cu.append(att_cu[-1] + 1)
        else:
            att_seq.append(b)
            att_lens.append(L)
            att_cu.append(att_cu[-1] + T)
        if L == seq.num_tokens:  # every known token computed: sample the next one
            for t in range(L - 1 - min(seq.num_draft, T - 1), L):  # and after each draft token
                logits_rows.append(row0 + t - start)
                sample_seqs.append(seq)
        # Summaries completed by this chunk (none needed by dense attention).
        n0, n1 = seq.num_summaries, (seq.num_summaries if self.dense else num_compressed(L, l, d))
        if n1 > n0:
            base = len(old_slots)
            first_old = n0 * d
            for t in range(first_old, start):
                old_slots.append(self._cmp_source_slot(seq, t))
            for i in range(n0, n1):
                entry_src.append([base + (t - first_old) if t < start else -1 - (row0 + t - start)
                                  for t in range(i * d, i * d + l)])
                entry_slots.append(table[i // E] * E + i % E)
        new_entries.append((n0, max(n0, n1)))
        if not self.shared:
            for t in range(max(start, L - self.cmp_ring), L):
                cmp_rows.append(row0 + t - start)
                cmp_slots.append(self._ring_slot(seq.cmp_ring, t, self.cmp_ring))
            for t in range(max(start, L - self.win_ring), L):
                win_rows.append(row0 + t - start)
                win_slots.append(self._ring_slot(seq.win_ring, t, self.win_ring))

    n_old = len(old_slots)
    # New rows were marked −1 − row; move them past the old rows of the flat source.
    src = torch.tensor(entry_src, dtype=torch.long).reshape(-1, l)
    src = torch.where(src < 0, n_old + (-1 - src), src)
    dev = self.device
    # Width: the longest table rounded up to a power of two, at least 16 (page 0 pads).
    longest = max(len(s.block_table) for s in seqs)
    max_pages = 16
    while max_pages < longest:
        max_pages *= 2
    bt = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    for b, s in enumerate(seqs):
        bt[b, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)

    def lt(x):
        return torch.tensor(x, dtype=torch.long).to(dev, non_blocking=True)

    num_decode_queries = queries if expand else num_decode
    inp = StepInputs(
        seqs=seqs, num_new=num_new, num_seqs=len(att_seq), num_decode=num_decode_queries,
        input_ids=lt(ids), positions=lt(pos), slots=lt(slots), block_tables=bt[att_seq].to(dev),
        seq_lens=torch.tensor(att_lens, dtype=torch.int32).to(dev),
        cu_seqlens_q=torch.tensor(att_cu, dtype=torch.int32).to(dev), cu_host=att_cu, seq_lens_host=att_lens,
        summary_old_slots=lt(old_slots), entry_src=src.to(dev), entry_slots=lt(entry_slots),
        new_entries=new_entries, logits_rows=lt(logits_rows), sample_seqs=sample_seqs,
    )
    if not self.shared:
        wt = torch.tensor([s.win_ring for s in seqs], dtype=torch.int32).reshape(len(seqs), -1)
        inp.win_tables = wt[att_seq].to(dev)
        inp.win_write_rows, inp.win_write_slots = lt(win_rows), lt(win_slots)
        inp.cmp_write_rows, inp.cmp_write_slots = lt(cmp_rows), lt(cmp_slots)
    return inp


def static_host_inputs_reference(self, seqs, size, num_new=None):
    """StaticDecode.host_inputs as its first version (torch element writes, every table converted
    each step): the twin of the numpy one with cached table rows. `self` is the StaticDecode.
    A sequence of n tokens (`num_new`; a row verifying n − 1 drafts) fills n rows, one a position."""
    r = self.runner
    P, E, d, l = r.P, r.E, r.cfg.cmp_stride, r.cfg.cmp_block
    trash = r.trash_page
    ids = torch.zeros(size, dtype=torch.long)
    pos = torch.zeros(size, dtype=torch.long)
    slots = torch.full((size,), trash * P, dtype=torch.long)
    tables = torch.full((size, self.max_pages), trash, dtype=torch.int32)
    lens = torch.ones(size, dtype=torch.int32)
    entry_slots = torch.full((size,), trash * E, dtype=torch.long)
    block_slots = torch.full((size, l), trash * P, dtype=torch.long)
    out = dict(ids=ids, pos=pos, slots=slots, tables=tables, lens=lens, entry_slots=entry_slots,
               block_slots=block_slots)
    if not r.shared:
        out["win_tables"] = torch.full((size, r.win_ring_pages), trash, dtype=torch.int32)
        out["win_slots"] = torch.full((size,), trash * P, dtype=torch.long)
        out["cmp_slots"] = torch.full((size,), trash * P, dtype=torch.long)
    rows = [(s, t) for i, s in enumerate(seqs)
            for t in range(s.num_computed_tokens, s.num_computed_tokens + (num_new[i] if num_new else 1))]
    for b, (s, t) in enumerate(rows):
        table = s.block_table
        ids[b] = s.token_ids[t]
        pos[b] = t
        slots[b] = table[t // P] * P + t % P
        tables[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
        lens[b] = t + 1
        if not r.shared:
            out["win_tables"][b] = torch.tensor(s.win_ring, dtype=torch.int32)
            out["win_slots"][b] = r._ring_slot(s.win_ring, t, r.win_ring)
            out["cmp_slots"][b] = r._ring_slot(s.cmp_ring, t, r.cmp_ring)
        # summaries before this position: the sequence's, or those its earlier rows complete
        n0, n1 = max(s.num_summaries, num_compressed(t, l, d)), num_compressed(t + 1, l, d)
        if not r.dense and n1 > n0:
            entry_slots[b] = table[n0 // E] * E + n0 % E
            block_slots[b] = torch.tensor([r._cmp_source_slot(s, u) for u in range(n0 * d, n0 * d + l)])
    return out
