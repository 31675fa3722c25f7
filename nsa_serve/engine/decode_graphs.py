"""Decode steps with fixed-shape inputs, replayed as CUDA graphs per padded batch size.

A step in which every sequence feeds exactly one token (its last sampled one) has the same shape
for a given batch size, so on CUDA it is captured once per padded size (1, 2, 4, 8, …) and replayed:
a 1B model's decode step is hundreds of small launches, which a graph issues at once.

Steps whose sequences verify n-gram drafts take this path too when their tokens attend as decode
rows (`ModelRunner.verify_as_decode`, on with CUDA): a sequence's 1 + k tokens fill 1 + k rows,
each a query at its own position over the sequence's pages, and every row is sampled. Graph sizes
count rows, up to `max_num_seqs` × (1 + k) (at most 256). Measured on an H100 (docs/benchmarks/
engine.md, forty-first session): with these steps on the mixed-step path speculation was slower
than plain decoding (0.51–0.99× on the bundled model); here, 1.19–1.81× at 75–80 % acceptance.

To keep shapes fixed, everything data-dependent becomes a padded tensor:
  * batch rows are padded to the graph size; pad rows point at the runner's *trash page* (a page
    the block manager never hands out), so their writes land there and their reads are harmless;
  * a decode token completes at most one compressed block (entry i completes at token i·d + l − 1),
    so each row carries one summary slot and the l token slots of that block — the trash page
    when the token completes none (a verifying sequence's rows each complete their own);
  * block tables have the width of the longest possible sequence.
φ reads the block's l tokens from the cache after the new token was written (shared K/V: the raw
pages; independent K/V: φ's staging ring), so no flat source of varying length is needed.

`StaticDecode.forward` is the same computation as `ModelRunner.execute` for such a step and runs
eagerly on CPU, where the tests compare it with the reference model; only the capture is CUDA-only.
If capture fails the engine logs it and stays eager.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from nsa_kernels.paged import gather_block_pair_reference, paged_nsa_attention_ref
from nsa_kernels.reference import num_compressed

from ..model.nsa_model import add_rms_norm

from .precompile import compile_only, first_layer_only
from .sampler import upload
from .sequence import Sequence
from .speculative import VERIFY, row_kind
from .table_rows import TableRows

log = logging.getLogger("nsa_serve.engine")


def graph_sizes(max_batch: int) -> list[int]:
    sizes = [1 << i for i in range(max(1, max_batch).bit_length()) if (1 << i) <= max_batch]
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def _block_gather(block_slots: torch.Tensor, P: int, device: torch.device):
    """cache [pages, Hkv, P, D] → the tokens of each row's compression block [size, Hkv, l, D].

    On CUDA one Triton gather a call (`gather_blocks`, contiguous out, so φ's flatten is a view);
    elsewhere advanced indexing with the page/row split computed once for all layers (it was four
    index launches a layer, plus a copy for φ's flatten of the permuted result)."""
    if device.type == "cuda":
        from nsa_kernels.cache_write import gather_blocks

        return lambda cache: gather_blocks(cache, block_slots)
    pages, rows = block_slots // P, block_slots % P
    return lambda cache: cache[pages, :, rows].permute(0, 2, 1, 3)


# Graph sizes up to this run φ as `phi_write_pair`: two launches, 12.4–17.0 µs a layer at 1–64
# sequences and 26.6–27.3 at 128 in a step where a row completes a block, 2.4–3.7 µs when none
# does, against 22.8–29.2 µs in every step for the five-launch path (H200, paper-1b,
# scripts/phi_decode_bench.py, 2026-12-04). In the engine's decode step with staggered lengths
# (scripts/profile_engine_decode.py --stagger), kernels summed 4.11 against 4.25 ms at 64 × 16k, and
# 3.47 at 32 × 32k against the five launches' 3.63 of the session before (which still ran the gates'
# sigmoid, ~0.03 ms, on its own). Wider graphs (max_num_seqs > 128) were not measured and keep the
# five launches.
FUSED_PHI_MAX_BATCH = 128


def fused_phi_available(model, device: torch.device) -> bool:
    """Whether decode steps run φ as `nsa_kernels.phi_decode.phi_write_pair` (CUDA, stacked φ
    weights, Dm a multiple of 16): gather, both products and the summary write in two launches
    instead of five, and nothing read in steps where no row completes a block (the five launches
    took ~20 µs a layer in every step at paper-1b, docs/benchmarks/engine.md)."""
    attn = model.layers[0].attn
    if device.type != "cuda" or not attn.has_phi_pair:
        return False
    try:
        from nsa_kernels.phi_decode import column_tile
    except ImportError:
        return False
    return column_tile(max(attn.cfg.head_dim_k, attn.cfg.head_dim_v)) > 0


def _block_gather_pair(block_slots: torch.Tensor, P: int, device: torch.device):
    """(k_cache, v_cache) → φ_pair's input [2, size·Hkv, l·Dm]: one Triton launch on CUDA
    (`gather_block_pair`), its PyTorch twin elsewhere."""
    if device.type == "cuda":
        from nsa_kernels.cache_write import gather_block_pair

        return lambda k_cache, v_cache: gather_block_pair(k_cache, v_cache, block_slots)
    return lambda k_cache, v_cache: gather_block_pair_reference(k_cache, v_cache, block_slots)


def block_gather(block_slots: torch.Tensor, P: int, device: torch.device, pair: bool):
    """The gather φ reads its blocks with, built once a forward for every layer: K and V blocks
    in one launch for φ_pair (`_block_gather_pair`), else one per cache (`_block_gather`)."""
    return (_block_gather_pair if pair else _block_gather)(block_slots, P, device)


def summaries_from_cache(runner, attn, cache, block_slots: torch.Tensor, entry_slots: torch.Tensor,
                         gather, pair: bool, fused: bool) -> None:
    """φ of each row's block (block_slots [N, l]: its tokens' cache slots), written to
    entry_slots [N]; rows that complete no block point at the trash page (both slots). `fused`:
    `phi_write_pair` (two launches, and nothing read when every row is trash); else the gather,
    φ's products and the summary write."""
    if pair and fused:
        from nsa_kernels.phi_decode import phi_write_pair

        phi_write_pair(cache.k_cache, cache.v_cache, block_slots, cache.kc_cache, cache.vc_cache,
                       entry_slots, *attn.phi_pair_weights(), skip_page=runner.trash_page)
        return
    if pair:
        sk, sv = attn.phi_pair(gather(cache.k_cache, cache.v_cache))
        n, Hkv = block_slots.shape[0], cache.k_cache.shape[1]
        sk, sv = sk.view(n, Hkv, -1), sv.view(n, Hkv, -1)
    else:
        sk, sv = attn.phi_k(gather(cache.k_cache)), attn.phi_v(gather(cache.v_cache))
    runner.write_pair(cache.kc_cache, cache.vc_cache, sk, sv, entry_slots)


def decode_attention(runner, q, gates, cache, tables, lens, win_tables=None) -> torch.Tensor:
    """Attention of single-token rows over fixed-shape inputs (tables [rows, pages], lens [rows]):
    the decode kernels (NSA or dense) where the backend has them, else the reference."""
    att = runner.attention
    if runner.dense and att.dense_decode_fn is not None:
        return att.dense_decode_fn(q, cache, tables, lens)
    if not runner.dense and att.decode_fn is not None:
        return att.decode_fn(q, gates, cache, tables, lens, att.p, win_tables=win_tables)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_nsa_attention_ref(q, gates, cache, tables, cu, lens, att.p, dense=runner.dense,
                                   win_tables=None if runner.dense else win_tables)


def _gather_ids(ids: torch.Tensor, ids_from, device: torch.device) -> None:
    """ids[:len(rows)] = tokens[rows] on the device, queued behind the step that sampled tokens."""
    tokens, rows = ids_from
    ids[:len(rows)] = tokens.to(ids.dtype)[upload(rows, torch.long, device)]


class StepInputs(dict):
    """A step's input tensors by name, all views of one flat byte buffer (`flat`), so moving them
    to the device is one copy instead of one per tensor (seven to ten a step: ~5–8 µs of host
    time each)."""

    def __init__(self, layout, device=None, pin: bool = False):
        super().__init__()
        offsets, total = [], 0
        for _, dtype, shape, _ in layout:
            total = -(-total // 8) * 8  # every view starts on an 8-byte boundary
            offsets.append(total)
            total += math.prod(shape) * dtype.itemsize
        self.flat = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin)
        self.table_cols = None  # host buffers: block-table columns each row holds (host_inputs)
        for (name, dtype, shape, _), off in zip(layout, offsets):
            n = math.prod(shape) * dtype.itemsize
            self[name] = self.flat[off:off + n].view(dtype).view(shape)

    def copy_(self, src: "StepInputs") -> None:
        """Every tensor from `src` (same layout): one copy, queued without waiting when `src` is
        pinned host memory."""
        self.flat.copy_(src.flat, non_blocking=True)


class Staging:
    """Host buffers of the step inputs, two per graph size used in turn; pinned on CUDA.

    Why pinned: a non-blocking copy from pageable memory returns at once only while it is small.
    On an H200 a 4 MB one waited for the GPU's queue (scripts/h2d_copy_probe.py: 5.1 ms behind a
    5 ms kernel; 0.08 ms at 1 MB), and an async-scheduled launch would then wait for the step
    before it. Block tables reach 2 MB at 256 sequences of 128k tokens. From pinned memory the copy
    call took 7–9 µs at every size. Why two: a buffer is refilled only after its last copy has
    run (an event); with one step in flight, that copy is two steps back and long done."""

    def __init__(self, owner, pinned: bool):
        # owner: StaticDecode, piecewise_graphs.PiecewiseSteps or piecewise_decode.DecodeRows
        # (`new_inputs(size, pin=…)`)
        self.owner, self.pinned = owner, pinned
        self._bufs: dict[int, list] = {}  # size → [[StepInputs, event or None], [...]]
        self._turn: dict[int, int] = {}

    def take(self, size: int) -> StepInputs:
        if size not in self._bufs:
            self._bufs[size] = [[self.owner.new_inputs(size, pin=self.pinned), None] for _ in range(2)]
            self._turn[size] = 0
        i = self._turn[size]
        self._turn[size] = 1 - i
        entry = self._bufs[size][i]
        if entry[1] is not None:
            entry[1].synchronize()
        return entry[0]

    def copied(self, host: StepInputs) -> None:
        """`host`'s copy to the device has been queued: it may be refilled once that has run."""
        if not self.pinned:
            return
        for entry in (e for entries in self._bufs.values() for e in entries):
            if entry[0] is host:
                if entry[1] is None:
                    entry[1] = torch.cuda.Event()
                entry[1].record()


class StaticDecode:
    def __init__(self, runner, max_batch: int, max_model_len: int):
        self.runner = runner
        self.sizes = graph_sizes(max_batch)
        self.max_pages = math.ceil(max_model_len / runner.P)
        self.graphs: dict[int, tuple] = {}
        self.steps = 0  # decode steps served by this path (for tests and logs)
        self._tables = TableRows()
        self._staging = Staging(self, pinned=runner.device.type == "cuda")
        # φ through nsa_kernels.phi_decode; False keeps the gather + phi_pair + write path (both
        # are the same products; set before capture() to compare them).
        self.fused_phi = fused_phi_available(runner.model, runner.device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def eligible(self, seqs: list[Sequence], num_new: list[int]) -> bool:
        """Every row a decode row, or (with `runner.verify_as_decode`) a row verifying all of its
        drafts, whose 1 + k tokens become 1 + k rows here (model_runner.py); at most max_batch rows."""
        verify = self.runner.verify_as_decode  # (a decode row's test first: the hot path's)
        return (0 < sum(num_new) <= self.max_batch
                and all((n == 1 and s.num_tokens - s.num_computed_tokens == 1)
                        or (verify and row_kind(s, n, True) == VERIFY) for s, n in zip(seqs, num_new)))

    # -- inputs -----------------------------------------------------------------------------------
    def _layout(self, size: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
        """The step inputs as (name, dtype, shape, padding value): the padded rows point at the
        trash page (tables, token slots, summary slots); ids, positions 0, lengths 1."""
        r = self.runner
        P, E, l, trash = r.P, r.E, r.cfg.cmp_block, r.trash_page
        i64, i32 = torch.int64, torch.int32
        out = [("ids", i64, (size,), 0), ("pos", i64, (size,), 0), ("slots", i64, (size,), trash * P),
               ("entry_slots", i64, (size,), trash * E), ("block_slots", i64, (size, l), trash * P),
               ("tables", i32, (size, self.max_pages), trash), ("lens", i32, (size,), 1)]
        if not r.shared:
            out[5:5] = [("win_slots", i64, (size,), trash * P), ("cmp_slots", i64, (size,), trash * P)]
            out.append(("win_tables", i32, (size, r.win_ring_pages), trash))
        return out

    def new_inputs(self, size: int, device=None, pin: bool = False) -> "StepInputs":
        """Uninitialised input tensors of a graph size, as views of one flat buffer."""
        return StepInputs(self._layout(size), device=device, pin=pin)

    def host_inputs(self, seqs: list[Sequence], size: int, out: "StepInputs | None" = None,
                    num_new: list[int] | None = None) -> "StepInputs":
        """The step's padded inputs on the host, written into `out` (a staging buffer) or new ones.
        `num_new`: tokens per sequence (1 each when None); a verifying sequence's n tokens fill n
        consecutive rows, each a decode query at its own position.

        Filled through numpy views with element writes and cached block-table rows: torch's
        per-element writes and converting every table from Python ints each step were ~0.7 ms of
        host time at batch 16 and 32k contexts on the development CPU. tests/prepare_reference.py
        keeps the torch loop version as the twin the tests compare this with."""
        r = self.runner
        P, E, d, l = r.P, r.E, r.cfg.cmp_stride, r.cfg.cmp_block
        if out is None:
            out = self.new_inputs(size)
        arrays = {}
        # A reused buffer holds an earlier step's rows: every input is reset to padding, except the
        # block tables ([size, pages of max_model_len], 2 MB at 256 × 128k), where only the
        # columns an earlier step wrote past this step's rows are (`StepInputs.table_cols`).
        for name, _, _, pad in self._layout(size):
            arrays[name] = a = out[name].numpy()
            if name != "tables" or out.table_cols is None:
                a.fill(pad)
        if out.table_cols is None:
            out.table_cols = np.zeros(size, dtype=np.int64)
        cols = out.table_cols
        ids, pos, slots, tables, lens = (arrays[k] for k in ("ids", "pos", "slots", "tables", "lens"))
        entry_slots, block_slots = arrays["entry_slots"], arrays["block_slots"]
        trash = r.trash_page
        b = 0  # the row
        for i, (s, row) in enumerate(zip(seqs, self._tables.rows(seqs))):
            table = s.block_table
            n0 = s.num_summaries
            start = s.num_computed_tokens
            for t in range(start, start + (1 if num_new is None else num_new[i])):  # the positions fed now
                # A token still pending on the device (async scheduling) is gathered in `execute`.
                ids[b] = s.token_ids[t] if t < len(s.token_ids) else 0
                pos[b] = t
                slots[b] = table[t // P] * P + t % P
                tables[b, :len(row)] = row
                if cols[b] > len(row):
                    tables[b, len(row):cols[b]] = trash
                cols[b] = len(row)
                lens[b] = t + 1
                if not r.shared:
                    arrays["win_tables"][b] = s.win_ring
                    arrays["win_slots"][b] = r._ring_slot(s.win_ring, t, r.win_ring)
                    arrays["cmp_slots"][b] = r._ring_slot(s.cmp_ring, t, r.cmp_ring)
                n1 = num_compressed(t + 1, l, d)
                if not r.dense and n1 > n0:
                    # (with shared K/V φ reads the block from the pages, after every row's write)
                    assert n1 == n0 + 1, "a decode token completes at most one compressed block"
                    entry_slots[b] = table[n0 // E] * E + n0 % E
                    block_slots[b] = [r._cmp_source_slot(s, u) for u in range(n0 * d, n0 * d + l)]
                    n0 = n1
                b += 1
        for b in np.flatnonzero(cols[b:]) + b:  # rows that are padding now
            tables[b, :cols[b]] = trash
            cols[b] = 0
        return out

    def new_entries(self, seqs: list[Sequence], num_new: list[int] | None = None) -> dict[Sequence, tuple[int, int]]:
        c = self.runner.cfg
        res = {}
        for i, s in enumerate(seqs):
            n0 = s.num_summaries
            end = s.num_computed_tokens + (1 if num_new is None else num_new[i])
            n1 = n0 if self.runner.dense else num_compressed(end, c.cmp_block, c.cmp_stride)
            res[s] = (n0, max(n0, n1))
        return res

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fixed-shape decode step over padded inputs → logits [size, vocab] (float32)."""
        r = self.runner
        model, write = r.model, r.write_pair
        size = x["ids"].shape[0]
        h = model.embed(x["ids"])
        rope = model.layers[0].attn.rope(x["pos"], h)  # one table for every layer
        # φ's block reads, every layer's: K and V blocks in one gather for φ_K and φ_V as one GEMM
        # chain (phi_pair; every layer is fused alike), else one gather per cache.
        pair = model.layers[0].attn.has_phi_pair
        gather = block_gather(x["block_slots"], r.P, h.device, pair)
        pending = None  # the previous layer's MLP output: added to h together with this layer's norm
        for li, layer in enumerate(model.layers):
            attn, cache = layer.attn, r.caches[li]
            if pending is None:
                a = layer.attn_norm(h)
            else:
                h, a = add_rms_norm(h, pending, layer.attn_norm)
            # The token's K/V into its page slots: in the RoPE launch with shared K/V.
            q, kv, gates = attn.project_and_gate(a, x["pos"], rope,
                                                 write=(cache.k_cache, cache.v_cache, x["slots"], write))
            if not r.shared:
                write(cache.k_cache, cache.v_cache, *kv["cmp"], x["cmp_slots"])
                write(cache.k_cache, cache.v_cache, *kv["win"], x["win_slots"])
            if not r.dense:  # after the token's own write: φ reads its block from the cache
                self._summaries(attn, cache, x, size, gather, pair)
            o = self._attend(q, gates, cache, x, size)
            h, a = add_rms_norm(h, attn.output(o), layer.mlp_norm)
            pending = layer.mlp.forward_fused(a)
        if pending is None:
            return model.logits(h).float()
        return model.head(add_rms_norm(h, pending, model.norm)[1]).float()

    def _summaries(self, attn, cache, x, size, gather, pair) -> None:
        """φ of the block each row completes, written to its summary slot (trash for none)."""
        summaries_from_cache(self.runner, attn, cache, x["block_slots"], x["entry_slots"], gather, pair,
                             self.fused_phi and size <= FUSED_PHI_MAX_BATCH)

    def _attend(self, q, gates, cache, x, size):
        return decode_attention(self.runner, q, gates, cache, x["tables"], x["lens"], x.get("win_tables"))

    def prepare(self, seqs: list[Sequence], num_new: list[int] | None = None) -> "StepInputs":
        """Host-side inputs of a decode-only step (`num_new`: tokens per sequence, 1 each when
        None), padded to the next graph size, written into this size's next staging buffer."""
        rows = len(seqs) if num_new is None else sum(num_new)
        size = next(s for s in self.sizes if s >= rows)
        return self.host_inputs(seqs, size, out=self._staging.take(size), num_new=num_new)

    def execute(self, host: "StepInputs", batch: int, ids_from=None) -> torch.Tensor:
        """Logits [batch, vocab] for a decode-only step (graph replay when captured).

        ids_from = (tokens, rows): the first `batch` input ids are tokens[rows], a device tensor
        the previous step sampled and the host has not read yet (async scheduling)."""
        size = host["ids"].shape[0]
        self.steps += 1
        dev = self.runner.device
        if size in self.graphs:
            graph, bufs, out = self.graphs[size]
            bufs.copy_(host)
            self._staging.copied(host)
            if ids_from is not None:
                _gather_ids(bufs["ids"], ids_from, dev)
            graph.replay()
            return out[:batch]
        x = host
        if host.flat.device != dev:
            x = self.new_inputs(size, device=dev)
            x.copy_(host)
            self._staging.copied(host)
        if ids_from is not None:
            _gather_ids(x["ids"], ids_from, dev)
        return self.forward(x)[:batch]

    # -- CUDA graphs ------------------------------------------------------------------------------
    def compile_sizes(self, inputs: dict[int, dict[str, torch.Tensor]], threads: int | None = None) -> None:
        """Compile every graph size's Triton kernels before the capture, in parallel: one forward
        per size in which launches only compile (`precompile.compile_only`, a thread pool where
        Triton has AsyncCompileMode). Why: the decode kernels are specialised per batch size, and
        the capture's first forward of each size compiled them one after another (the first step
        and the graphs took 39.5 s of a cold start on an H200, docs/benchmarks/engine.md). Nothing
        Triton runs, so the torch ops in between see garbage and write only their own outputs and
        the trash page (the inputs are all padding)."""
        with first_layer_only(self.runner.model), compile_only(threads):
            for bufs in inputs.values():
                self.forward(bufs)

    def capture(self) -> None:
        """Capture one graph per padded size (all-pad inputs: writes go to the trash page)."""
        dev = self.runner.device
        inputs = {}
        for size in self.sizes:
            inputs[size] = self.new_inputs(size, device=dev)
            inputs[size].copy_(self.host_inputs([], size))
        self.compile_sizes(inputs)
        pool = None
        for size in reversed(self.sizes):
            bufs = inputs[size]
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile / autotune outside the capture
                    self.forward(bufs)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(bufs)
            pool = graph.pool()
            self.graphs[size] = (graph, bufs, out)
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)
