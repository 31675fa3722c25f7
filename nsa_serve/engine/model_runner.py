"""Tensors of one engine step: the page pool, the step's index tensors, the forward pass.

The runner owns the paged cache (one `PagedLayerCache` per layer, DESIGN.md §3) and runs the
model's layers piece by piece so that K/V and summaries go into pages:

  per layer: attn.project_and_gate (which also writes K/V into pages) → K/V into the rings →
  φ on the blocks completed this step → write summaries beside their page → attention over the
  pages → gates → MLP.

On CUDA, a step with prompt chunks of up to `piecewise_max_tokens` tokens replays everything but
the attention as CUDA graphs (`piecewise_graphs.py`), and its attention from graphs of its own
where it can (`piecewise_decode.py`, `piecewise_prefill.py`); `execute` picks that path when
`prepare` padded the step's inputs for it.

A step mixes single-token (decode) rows and prompt chunks of any sequences. Rows are ordered
decode first, then chunks, so each attention implementation gets one contiguous slice.

Rows verifying n-gram drafts (speculative.py: the last sampled token and k drafts, a (1 + k)-token
chunk) come between the two. Attention sees each of their tokens as a decode row of its own: the
sequence's block table at the length up to that token (`verify_as_decode`, on with CUDA). The
step writes every row's K/V and summaries before any attention reads the pages, so each such
query reads what a chunk's query at its position reads. What it buys is the decode kernel — split
over the context, built for a few queries a sequence — instead of the prefill kernel, whose tiles
of up to 128 query rows a kv group hold 1 + k tokens (5 of 128 at k = 4) and whose compressed
sweeps run one program per kv group and chunk over the whole context; and, in a piecewise step,
the decode rows' attention graphs (piecewise_decode.py). The sampled rows, summaries and K/V
writes stay per sequence: only attention's view changes. A step of only decode and verifying rows
takes the decode graphs instead (decode_graphs.py), where each verifying token is a row. Measured
on an H100 at 32k tokens (paper-1b, docs/benchmarks/engine.md): a verifying step took 3.55 ms
here as decode rows against 6.22 ms as chunks at batch 1 (5.00 vs 7.76 ms at batch 8); in the
decode graphs, 2.18 ms.

Summaries. Entry i covers tokens [i·d, i·d + l) and is made when its last token is computed. Its
tokens may be partly in the cache (computed in earlier steps) and partly in this step's fresh
K/V, so φ reads from one flat source: [old rows gathered from the cache ; this step's rows], and
`entry_src` indexes l rows of it per new entry. With shared K/V the old rows come from the raw
pages; with independent K/V from φ's staging ring (which holds the last P·⌈l/P⌉ ≥ l tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nsa_kernels.paged import PagedLayerCache, read_slots, write_slots
from nsa_kernels.reference import num_compressed

from ..model.nsa_model import NSAModel, add_rms_norm
from .attention import AttentionBackend
from .sequence import Sequence
from .speculative import DECODE, VERIFY, row_kind
from .table_rows import TableRows


@dataclass
class StepInputs:
    seqs: list[Sequence]  # in row order (decode first)
    num_new: list[int]
    num_seqs: int
    num_decode: int
    input_ids: torch.Tensor  # [Ttot]
    positions: torch.Tensor  # [Ttot]
    slots: torch.Tensor  # [Ttot] raw-page slots
    # the eager attention's: None in a step whose attention graphs serve all of it (piecewise)
    block_tables: torch.Tensor | None  # [B, max_pages] int32
    seq_lens: torch.Tensor | None  # [B] int32, after this step
    cu_seqlens_q: torch.Tensor | None  # [B+1] int32
    cu_host: list[int]
    seq_lens_host: list[int]
    summary_old_slots: torch.Tensor  # rows φ reads from the cache
    entry_src: torch.Tensor  # [Ne, l] rows of [old ; new] per new summary
    entry_slots: torch.Tensor  # [Ne] summary slots
    new_entries: list[tuple[int, int]]  # per sequence: (first, end) entries written
    logits_rows: torch.Tensor  # rows whose logits are sampled
    sample_seqs: list[Sequence]
    # Prompt logprobs: rows whose next token is a prompt token, those tokens, and per sequence
    # (seq, position of the first target, count); the forward fills prompt_result.
    prompt_rows: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt_targets_host: list[int] = field(default_factory=list)
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    prompt_k: int = 0
    prompt_result: "PromptLogprobs | None" = None
    # independent K/V only
    win_tables: torch.Tensor | None = None
    win_write_rows: torch.Tensor | None = None
    win_write_slots: torch.Tensor | None = None
    cmp_write_rows: torch.Tensor | None = None
    cmp_write_slots: torch.Tensor | None = None
    # the Triton prefill kernel's tile layout, built by the first layer and reused by the others
    prefill_plan: object | None = None
    # piecewise_graphs: the padded device inputs when the step runs that way (ids, positions, slots
    # and entry_slots above are views of them; summary_old_slots and entry_src are then unused),
    # and its decode rows' padded tables and lengths (piecewise_decode), when it has decode rows
    piecewise: object | None = None
    piecewise_decode: object | None = None
    # and, when its chunks' attention replays piecewise_prefill's graphs, the padded size
    piecewise_prefill: int | None = None


@dataclass
class PromptLogprobs:
    """Per prompt row (host lists): the target token's logprob and rank, and the top-k (ids, logprobs)."""

    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def attention_rows(cu: list[int], lens: list[int], pos: np.ndarray, first_chunk: int):
    """Attention's view of a step whose sequences 0 … first_chunk − 1 are decode or verifying
    rows (one query a token) and the rest prompt chunks: per attention row, the index of its
    sequence, its length (a query's own position + 1 for the first kind) and the rows' offsets.
    Returns (seq_of_att_row, att_lens, att_cu, number of decode queries)."""
    nq = cu[first_chunk]  # decode queries: the first nq token rows
    seq = np.concatenate([np.repeat(np.arange(first_chunk), np.diff(cu[:first_chunk + 1])),
                          np.arange(first_chunk, len(lens))]).astype(np.int64)
    return seq, (pos[:nq] + 1).tolist() + lens[first_chunk:], list(range(nq)) + cu[first_chunk:], nq


PROMPT_LOGPROB_ROWS = 256  # rows of full-vocabulary logits alive at once (vocab 128k: 128 MB fp32)


def prompt_logprobs(model, h: torch.Tensor, targets: torch.Tensor, k: int) -> PromptLogprobs:
    """Log-softmax of the model's logits at rows `h`, read at `targets`, in slices so a long prompt
    chunk never holds [rows, vocab] at once."""
    lp_all, rank_all, ti_all, tv_all = [], [], [], []
    for i in range(0, h.shape[0], PROMPT_LOGPROB_ROWS):
        lp = torch.log_softmax(model.logits(h[i:i + PROMPT_LOGPROB_ROWS]).float(), dim=-1)
        tgt = targets[i:i + PROMPT_LOGPROB_ROWS].unsqueeze(1)
        chosen = lp.gather(1, tgt)
        lp_all.append(chosen.squeeze(1))
        rank_all.append((lp > chosen).sum(dim=1) + 1)  # vLLM's rank: 1 + tokens strictly more likely
        if k:
            v, ix = lp.topk(k, dim=-1)
            tv_all.append(v)
            ti_all.append(ix)
    return PromptLogprobs(torch.cat(lp_all).tolist(), torch.cat(rank_all).tolist(),
                          torch.cat(ti_all).tolist() if k else [[] for _ in range(h.shape[0])],
                          torch.cat(tv_all).tolist() if k else [[] for _ in range(h.shape[0])])


def cache_bytes_per_page(model_cfg, dtype: torch.dtype) -> int:
    c = model_cfg
    E = c.select_block // c.cmp_stride
    elt = torch.tensor([], dtype=dtype).element_size()
    return c.num_layers * c.num_kv_heads * (c.select_block + E) * (c.head_dim_k + c.head_dim_v) * elt


def ring_pages(model_cfg, max_chunk: int) -> tuple[int, int]:
    """Pages of the (window, φ staging) rings each sequence of an independent-K/V model needs.

    The window ring keeps w + T − 1 tokens for a chunk of T ≤ max_chunk queries (its first query
    looks w − 1 tokens back after the whole chunk is written); φ's ring keeps l tokens.
    Shared-K/V models need no rings.
    """
    c = model_cfg
    if c.shared_kv:
        return 0, 0
    return math.ceil((c.window + max_chunk - 1) / c.select_block), math.ceil(c.cmp_block / c.select_block)


def table_width(pages: int) -> int:
    """Width of an eager step's block tables for a longest sequence of `pages` pages: the next
    power of two, at least 16. The attention kernels specialise on sizes that follow the width (its
    power of two, and whether strides divide by 16), so exact widths made eager steps compile a new
    variant the first time they met each class: `scripts/count_decode_variants.py` counts 109 decode
    variants over batch 1–16 × widths 1–1024 pages, 53 with this rounding. Padding entries are page
    0, a valid id the kernels mask (their documented precondition)."""
    return max(16, 1 << (max(1, pages) - 1).bit_length())


class ModelRunner:
    def __init__(self, model: NSAModel, num_pages: int, attention: str = "nsa", max_chunk: int = 512):
        # One GEMM for a layer's q/K/V/gate projections and one for the MLP's gate/up (fewer,
        # larger launches a step; the weights are shared with the reference paths, not copied),
        # and φ_K/φ_V stacked for the decode graphs (a padded copy, NSAAttention.fuse_phi).
        self.model = model.fuse_for_inference()
        self.cfg = c = model.cfg
        self._table_rows = TableRows()  # block tables as numpy rows, between steps
        self.p = c.sparsity
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.P = c.select_block
        self.E = c.select_block // c.cmp_stride
        self.shared = c.shared_kv
        self.dense = attention == "dense"
        # Verifying rows' tokens attend as decode rows (the module's docstring) where the decode
        # kernel does it. Not on CPU: the reference's per-sequence decode path made speculation
        # 1.4–2.4× slower there than attending the rows as chunks through SDPA (the bundled model,
        # k = 4; docs/benchmarks/engine.md).
        self.verify_as_decode = self.device.type == "cuda"
        self.win_ring_pages, self.cmp_ring_pages = ring_pages(c, max_chunk)
        self.win_ring = self.win_ring_pages * self.P
        self.cmp_ring = self.cmp_ring_pages * self.P
        self.num_pages = num_pages
        # One extra page the block manager never hands out: padded rows of fixed-shape (CUDA graph)
        # decode steps write there (decode_graphs.py).
        self.trash_page = num_pages
        self.static_decode = None  # decode_graphs.StaticDecode when fixed-shape decode is on
        self.piecewise = None  # piecewise_graphs.PiecewiseSteps when prompt steps replay graphs
        self.caches = [PagedLayerCache.allocate(num_pages + 1, c.num_kv_heads, c.head_dim_k, c.head_dim_v,
                                                self.P, c.cmp_stride, dtype=self.dtype, device=self.device)
                       for _ in range(c.num_layers)]
        self.attention = AttentionBackend(attention, self.device, self.p)
        self.write = write_slots
        self.write_pair = self._write_pair  # K and V (or their summaries) of the same rows
        if self.device.type == "cuda":  # the Triton scatters when they are there (same result)
            try:
                from nsa_kernels.cache_write import write_kv, write_kv_pair
                self.write, self.write_pair = write_kv, write_kv_pair
            except ImportError:
                pass

    def _write_pair(self, k_cache, v_cache, k, v, slots) -> None:
        self.write(k_cache, k, slots)
        self.write(v_cache, v, slots)

    # -- inputs -----------------------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> StepInputs:
        """The step's index tensors. Per-token indices (positions, page slots, ring slots, φ's
        source rows) come from a few numpy ops over the whole step, not Python loops per token.
        Medians on the 2-core development CPU, loops → now: an 8k-token prompt chunk 5.2 → 1.0 ms
        (6–10 ms were seen on the GPU machine's host), a 2.4k-token mixed step 1.6 → 0.5 ms,
        16 decode rows 0.28 → 0.14 ms (independent K/V 0.33 → 0.20). `tests/prepare_reference.py`
        keeps the loop version as the obviously-correct twin; tests compare the two on every step."""
        P, E, d, l = self.P, self.E, self.cfg.cmp_stride, self.cfg.cmp_block
        # Row order: decode rows, rows verifying drafts, prompt chunks (stable within each).
        kind = [row_kind(s, n, self.verify_as_decode) for s, n in zip(seqs, num_new)]
        order = sorted(range(len(seqs)), key=kind.__getitem__)
        seqs = [seqs[b] for b in order]
        num_new = [num_new[b] for b in order]
        num_decode = kind.count(DECODE)
        num_verify = kind.count(VERIFY)
        B = len(seqs)
        ids, cu, lens, starts = [], [0], [], []
        old_slots, new_entries, logits_rows, sample_seqs = [], [], [], []
        prompt_rows, prompt_targets, prompt_spans, prompt_k = [], [], [], 0
        # Per new summary: its sequence, index, and where its tokens are (lengths = entries).
        e_seq, e_idx, e_start, e_row0, e_base, e_first = [], [], [], [], [], []
        bt = np.zeros((B, table_width(max(len(s.block_table) for s in seqs))), dtype=np.int32)
        # The piecewise graphs' φ reads every block from the pages with shared K/V: no flat source
        # to build (independent K/V: a flat source of fixed shape, piecewise_graphs.py).
        pw = self.piecewise if self.piecewise is not None and self.piecewise.eligible(sum(num_new)) else None
        for b, (seq, T, row) in enumerate(zip(seqs, num_new, self._table_rows.rows(seqs))):
            start, L = seq.num_computed_tokens, seq.num_computed_tokens + T
            row0 = cu[-1]
            bt[b, :len(row)] = row  # cached numpy rows: a list → array copy was O(pages) a row a step
            ids.extend(seq.token_ids[start:L])
            starts.append(start)
            cu.append(row0 + T)
            lens.append(L)
            if L == seq.num_tokens:  # every known token computed: sample the next one
                # A row verifying k drafts (its last k tokens) samples after each of its last
                # k + 1 positions (speculative.py).
                k = min(seq.num_draft, T - 1)
                logits_rows.extend(range(row0 + T - 1 - k, row0 + T))
                sample_seqs.extend([seq] * (k + 1))
            if seq.wants_prompt_logprobs and start < seq.num_prompt_tokens - 1:
                # Row of position p predicts token p + 1: rows up to the prompt's second-to-last token.
                last = min(L, seq.num_prompt_tokens - 1)
                prompt_rows.extend(range(row0, row0 + last - start))
                prompt_targets.extend(seq.token_ids[start + 1:last + 1])
                prompt_spans.append((seq, start + 1, last - start))
                prompt_k = max(prompt_k, seq.params.prompt_logprobs)
            # Summaries completed by this chunk (none needed by dense attention). Entry i reads
            # tokens i·d … i·d + l − 1: those before `start` from the cache (old rows, numbered
            # from `base` in the flat source), the rest from this step's rows.
            n0, n1 = seq.num_summaries, (seq.num_summaries if self.dense else num_compressed(L, l, d))
            if n1 > n0:
                k = n1 - n0
                e_seq += [b] * k
                e_idx.extend(range(n0, n1))
                e_start += [start] * k
                e_row0 += [row0] * k
                e_base += [len(old_slots)] * k
                e_first += [n0 * d] * k
                if pw is None or not self.shared:
                    old_slots.extend(self._cmp_source_slot(seq, t) for t in range(n0 * d, start))
            new_entries.append((n0, max(n0, n1)))

        # Per-row sequence, position and raw-page slot, for all rows at once (numpy: a decode step
        # has few rows, and numpy's per-call cost is a fraction of torch's).
        i64 = np.int64
        seq_of_row = np.repeat(np.arange(B), num_new)
        pos = (np.asarray(starts, dtype=i64)[seq_of_row] + np.arange(cu[-1])
               - np.asarray(cu[:-1], dtype=i64)[seq_of_row])
        slots = bt[seq_of_row, pos // P].astype(i64) * P + pos % P
        ei = np.asarray(e_idx, dtype=i64)
        t = ei[:, None] * d + np.arange(l)  # the tokens of each new summary
        entry_slots = bt[np.asarray(e_seq, dtype=i64), ei // E].astype(i64) * E + ei % E
        dev = self.device

        def lt(x):
            x = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.tensor(x, dtype=torch.long)
            return x.to(dev, non_blocking=True)

        T = cu[-1]
        # Attention's rows: the verifying sequences' tokens as decode rows (the module's docstring)
        # — unless the decode rows' graphs of a piecewise step cannot hold that many; then they
        # attend as the chunks they are.
        first_chunk = num_decode + num_verify
        if num_verify and pw is not None and pw.decode_rows is not None and cu[first_chunk] > pw.decode_rows.max_rows:
            first_chunk = num_decode
        att_seq, att_bt, att_lens, att_cu, att_nd = None, bt, lens, cu, num_decode
        if first_chunk > num_decode:
            att_seq, att_lens, att_cu, att_nd = attention_rows(cu, lens, pos, first_chunk)
            att_bt = bt[att_seq]
        att_B = len(att_lens)
        # Graphs serve all of this step's attention (piecewise_decode / piecewise_prefill): the
        # eager attention's device tables, lengths and offsets would go unused, so they are not made.
        graphs_attend = pw is not None and (att_nd == 0 or pw.decode_rows is not None) and (
            att_nd == att_B or (pw.prefill_rows is not None and pw.prefill_rows.serves(pw.size_for(T))))
        wt = rings = None
        if not self.shared:
            # Rings: each chunk's last ring_tokens rows are written to the ring slot of their position.
            row_len = np.asarray(lens, dtype=i64)[seq_of_row]
            wt = np.asarray([s.win_ring for s in seqs], dtype=np.int32).reshape(B, -1)
            ct = np.asarray([s.cmp_ring for s in seqs], dtype=np.int32).reshape(B, -1)
            rings = []
            for table, ring_tokens in ((ct, self.cmp_ring), (wt, self.win_ring)):
                rows = np.flatnonzero(pos >= row_len - ring_tokens)
                r = pos[rows] % ring_tokens
                rings.append((rows, table[seq_of_row[rows], r // P].astype(i64) * P + r % P))

        def flat_source(n_old: int) -> np.ndarray:
            """φ's source rows per new summary [Ne, l]: old rows first (0 … n_old − 1), then this
            step's rows."""
            e_start_c = np.asarray(e_start, dtype=i64)[:, None]
            old_row = np.asarray(e_base, dtype=i64)[:, None] + t - np.asarray(e_first, dtype=i64)[:, None]
            src = np.where(t < e_start_c, old_row, n_old + np.asarray(e_row0, dtype=i64)[:, None] + t - e_start_c)
            return src.reshape(-1, l)

        if pw is not None:
            arrays = dict(ids=np.asarray(ids, dtype=i64), pos=pos, slots=slots, entry_slots=entry_slots)
            if self.shared:
                # Every block φ completes is read from the pages (shared K/V: they hold the step's
                # rows once written), so each entry carries its l token slots instead of a flat source.
                arrays["block_slots"] = bt[np.asarray(e_seq, dtype=i64)[:, None], t // P].astype(i64) * P + t % P
            else:
                # φ's old rows come from its ring, read before the step writes it: a flat source
                # whose old part has the size's fixed row count.
                size = pw.size_for(T)
                arrays.update(old_slots=np.asarray(old_slots, dtype=i64), entry_src=flat_source(pw.max_old(size)),
                              cmp_rows=rings[0][0], cmp_slots=rings[0][1], win_rows=rings[1][0],
                              win_slots=rings[1][1])
            x = pw.upload(**arrays)
            ids_t, pos_t, slots_t = x["ids"][:T], x["pos"][:T], x["slots"][:T]
            entry_t = x["entry_slots"][:len(entry_slots)]
            old_t = src_t = None
        else:
            x = None
            ids_t, pos_t, slots_t, entry_t = lt(ids), lt(pos), lt(slots), lt(entry_slots)
            old_t, src_t = lt(old_slots), lt(flat_source(len(old_slots)))
        att_wt = wt if att_seq is None or wt is None else wt[att_seq]
        inp = StepInputs(
            seqs=seqs, num_new=num_new, num_seqs=att_B, num_decode=att_nd,
            input_ids=ids_t, positions=pos_t, slots=slots_t,
            block_tables=None if graphs_attend else torch.from_numpy(att_bt).to(dev),
            seq_lens=None if graphs_attend else torch.tensor(att_lens, dtype=torch.int32).to(dev),
            cu_seqlens_q=None if graphs_attend else torch.tensor(att_cu, dtype=torch.int32).to(dev),
            cu_host=att_cu, seq_lens_host=att_lens,
            summary_old_slots=old_t, entry_src=src_t, entry_slots=entry_t,
            new_entries=new_entries, logits_rows=lt(logits_rows), sample_seqs=sample_seqs, piecewise=x,
        )
        if pw is not None and att_nd and pw.decode_rows is not None:
            inp.piecewise_decode = pw.decode_rows.upload(att_bt, att_lens, att_nd, win_tables=att_wt)
        size = len(x["ids"]) if x is not None else 0
        # (the chunks' graphs only beside the decode rows' graphs: the eager call does both or the chunks)
        if graphs_attend and att_nd < att_B:
            pw.prefill_rows.upload(size, att_bt, att_cu, att_lens, att_nd, win_tables=att_wt)
            inp.piecewise_prefill = size
        if prompt_spans:
            inp.prompt_rows, inp.prompt_targets = lt(prompt_rows), lt(prompt_targets)
            inp.prompt_spans, inp.prompt_k, inp.prompt_targets_host = prompt_spans, prompt_k, prompt_targets
        if not self.shared:
            if not graphs_attend:
                inp.win_tables = torch.from_numpy(att_wt).to(dev)
            if pw is None:  # (the pieces write the rings from their own padded rows)
                (inp.cmp_write_rows, inp.cmp_write_slots), (inp.win_write_rows, inp.win_write_slots) = (
                    (lt(rows), lt(ring_slots)) for rows, ring_slots in rings)
        return inp

    def _cmp_source_slot(self, seq: Sequence, t: int) -> int:
        if self.shared:
            return seq.block_table[t // self.P] * self.P + t % self.P
        return self._ring_slot(seq.cmp_ring, t, self.cmp_ring)

    def overwrites_phi_source(self, seq: Sequence, num_new: int) -> bool:
        """Independent K/V: whether a step of `num_new` tokens of `seq` overwrites, in φ's ring,
        old rows its own new summaries read. The step reads them before writing the ring, but a
        step that failed part-way has left some layers' rings without them, and a retry would
        then compute wrong summaries. The old rows are tokens [first, start), first being where
        the sequence's next summary starts; after the step's writes the ring holds only its last
        R tokens, [end − R, end)."""
        if self.shared or self.dense:  # (dense attention makes no summaries)
            return False
        p = self.cfg
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        first = seq.num_summaries * p.cmp_stride
        reads_old = num_compressed(end, p.cmp_block, p.cmp_stride) > seq.num_summaries and first < start
        return reads_old and first < end - self.cmp_ring

    def _ring_slot(self, ring: list[int], t: int, ring_tokens: int) -> int:
        r = t % ring_tokens
        return ring[r // self.P] * self.P + r % self.P

    # -- forward ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> torch.Tensor:
        """Run the step; return logits [len(inp.sample_seqs), vocab] (float32)."""
        model = self.model
        h = self.piecewise.forward(inp) if inp.piecewise is not None else self._layers(inp)
        if inp.prompt_spans:
            inp.prompt_result = prompt_logprobs(model, h[inp.prompt_rows], inp.prompt_targets, inp.prompt_k)
        return model.logits(h[inp.logits_rows]).float()

    def _layers(self, inp: StepInputs) -> torch.Tensor:
        """The layers, eagerly: hidden states [Ttot, hidden] before the final norm."""
        model = self.model
        h = model.embed(inp.input_ids)
        has_entries = inp.entry_slots.numel() > 0
        write = self.write_pair
        rope = model.layers[0].attn.rope(inp.positions, h)  # one table for every layer
        pending = None  # the previous layer's MLP output: added to h together with this layer's norm
        for li, layer in enumerate(model.layers):
            attn, cache = layer.attn, self.caches[li]
            if pending is None:
                x = layer.attn_norm(h)
            else:
                h, x = add_rms_norm(h, pending, layer.attn_norm)
            # The token's K/V into its page slots: in the RoPE launch with shared K/V.
            q, kv, gates = attn.project_and_gate(x, inp.positions, rope,
                                                 write=(cache.k_cache, cache.v_cache, inp.slots, write))
            if has_entries:
                self.write_summaries(attn, cache, kv["cmp"], inp.summary_old_slots, inp.entry_src, inp.entry_slots)
            if not self.shared:
                self.write_rings(cache, kv, inp.cmp_write_rows, inp.cmp_write_slots, inp.win_write_rows,
                                 inp.win_write_slots)
            o = self.attention(q, gates, cache, inp)
            h, x = add_rms_norm(h, attn.output(o), layer.mlp_norm)
            pending = layer.mlp.forward_fused(x)
        return h if pending is None else h + pending

    def write_summaries(self, attn, cache: PagedLayerCache, kv_cmp, old_slots, entry_src, entry_slots) -> None:
        """φ of each new summary over its l source rows, written to entry_slots [Ne]. The source is
        flat: [rows old_slots of the cache ; this step's compression-branch K/V (kv_cmp)], and
        entry_src [Ne, l] indexes it."""
        k_new, v_new = kv_cmp
        # φ's old rows: the raw pages (shared K/V; already hold this step's rows too, but the old
        # rows are all before the step) or the staging ring, read before this step writes it.
        k_src = torch.cat([read_slots(cache.k_cache, old_slots), k_new])
        v_src = torch.cat([read_slots(cache.v_cache, old_slots), v_new])
        kb = k_src[entry_src].permute(0, 2, 1, 3)  # [Ne, Hkv, l, Dk]
        vb = v_src[entry_src].permute(0, 2, 1, 3)
        self.write_pair(cache.kc_cache, cache.vc_cache, attn.phi_k(kb), attn.phi_v(vb), entry_slots)

    def write_rings(self, cache: PagedLayerCache, kv, cmp_rows, cmp_slots, win_rows, win_slots) -> None:
        """Independent K/V: rows cmp_rows of the step's compression-branch K/V into φ's ring slots,
        rows win_rows of the window branch's into the window ring's."""
        for branch, rows, slots in (("cmp", cmp_rows, cmp_slots), ("win", win_rows, win_slots)):
            k, v = kv[branch]
            self.write_pair(cache.k_cache, cache.v_cache, k[rows], v[rows], slots)
