"""Prompt and mixed steps with the work between attention calls replayed as CUDA graphs.

A step that is not decode-only (a prompt chunk, alone or beside decode rows) runs eagerly: on an
H200 host a paper-1b step launches ~600 torch ops and ~270 Triton kernels from Python, ~30 ms of
host time, whatever its GPU time (docs/benchmarks/engine.md, thirtieth engine round). Its
attention calls have shapes of their own (the prefill kernel's grid follows the step's chunks and
contexts), so the rest of a layer is captured apart from them, as in vLLM's piecewise CUDA
graphs: per padded token count (16, 32, …, `max_tokens`) one graph per layer boundary, replayed
around the attention calls:

  piece 0:     embed → RoPE tables → layer 0's norm, projections (+ K/V page write), φ
  piece i:     layer i−1's output projection, residual, MLP → layer i's norm, projections, φ
  piece L:     layer L−1's output projection, residual, MLP → the final hidden states

Measured on an H200 (paper-1b, docs/benchmarks/engine.md, thirty-second engine round): a lone
16–512-token prompt's step 14–36 → 6.5–13 ms, the same beside 32 decode rows 30–33 → 14 ms,
2000 tokens 1.2–1.4× faster. The attention calls between the pieces were then most of what was
left (profiled: ~0.4–0.7 ms of host time a layer each for the decode and prefill calls); they are
graphs of their own too, the decode rows' (piecewise_decode.py) and, for steps of up to 512
tokens, the chunks' (piecewise_prefill.py): a lone 16–128-token prompt's step 8.6–11 → 3.5–4.1 ms,
beside 32 decode rows 13.4 → 5.2–6.6 ms (thirty-fourth session). Larger steps call the prefill
eagerly.

Shapes are fixed by padding, as in decode_graphs.py: pad rows have position 0 and write their
K/V into the runner's trash page; φ runs on a fixed number of entry rows, the unused ones
pointing at the trash page. With shared K/V, φ reads each completed block's l tokens from the
pages after the step's K/V were written. An independent-K/V model's φ reads its own ring, which a
chunk longer than the ring overwrites while writing it, so there φ takes the eager step's flat
source, [old rows read from the ring ; the step's rows], with the old part padded to its bound
(`max_old`: l − 1 rows a sequence), before the pieces write both rings from padded row lists
(pad rows go to the trash page). Its attention graphs take the window rings' tables too.

The pieces hand the residual stream, q and the gates to the next call through buffers shared by
every size (a copy each at the end of a piece: ~25 µs a layer at 2048 tokens, nothing at small
sizes), and the eager attention writes its output into a fourth. They cost ~100 MB of GPU memory
at 2048 tokens for paper-1b, plus the graphs' pool; the page pool is sized before them, within
the headroom that `gpu_memory_utilization` leaves.

`forward` is the same computation as `ModelRunner.execute` for such a step; it runs eagerly on
CPU, where the tests compare the two. Only the capture is CUDA-only; if it fails the engine logs
it and these steps stay eager.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..model.nsa_model import add_rms_norm
from .decode_graphs import Staging, StepInputs, block_gather, summaries_from_cache
from .piecewise_decode import DecodeRows
from .piecewise_prefill import PrefillRows
from .piecewise_prefill import available as prefill_graphs_available

log = logging.getLogger("nsa_serve.engine")

MIN_TOKENS = 16


def capture_sizes(max_tokens: int) -> list[int]:
    """Padded token counts: powers of two from 16 up to `max_tokens` (itself last when it is not
    one)."""
    sizes, s = [], MIN_TOKENS
    while s < max_tokens:
        sizes.append(s)
        s *= 2
    sizes.append(max(max_tokens, MIN_TOKENS))
    return sizes


class PiecewiseSteps:
    def __init__(self, runner, max_tokens: int, max_seqs: int, max_model_len: int, decode_queries: int = 1):
        """decode_queries: most decode queries a sequence brings to a step (1 + k with k draft
        tokens: a verifying row attends as 1 + k decode rows, model_runner.py)."""
        self.runner = runner
        self.sizes = capture_sizes(max_tokens)
        self.max_seqs = max_seqs
        self.graphs: dict[int, list] = {}  # size → [graph per piece]
        self.steps = 0  # steps served by this path (for tests and logs)
        self._staging = Staging(self, pinned=runner.device.type == "cuda")
        self._dev: dict[int, StepInputs] = {}
        # size → what piece 0 hands the later pieces (the RoPE tables) in the captured graphs; the
        # graphs' pool owns that memory, so it is kept referenced here.
        self._graph_state: dict[int, dict] = {}
        c, S = runner.cfg, self.sizes[-1]
        dev, dt = runner.device, runner.dtype
        H, hidden = c.num_heads, c.hidden_size
        # The state handed between pieces, shared by every size (views of the first rows): the
        # residual stream, and a layer's q, gates and attention output.
        self.h = torch.zeros(S, hidden, dtype=dt, device=dev)
        self.q = torch.zeros(S, H, c.head_dim_k, dtype=dt, device=dev)
        self.gates = torch.zeros(S, H, 3, dtype=dt, device=dev)
        self.o = torch.zeros(S, H, c.head_dim_v, dtype=dt, device=dev)
        # The decode rows' attention, and the chunks' (NSA with the Triton prefill), as graphs of
        # their own (piecewise_decode.py, piecewise_prefill.py); None: that part stays in the eager
        # attention call (the probe detaches them to compare).
        self.decode_rows = DecodeRows(runner, self.q, self.gates, self.o, min(max_seqs * decode_queries, S),
                                      max_model_len)
        self.prefill_rows = (PrefillRows(runner, self.q, self.gates, self.o, self.sizes, max_seqs, max_model_len)
                             if prefill_graphs_available(runner) else None)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def max_entries(self, size: int) -> int:
        """Most summaries a step of `size` tokens completes: a chunk of T tokens completes at most
        ⌊T/d⌋ + 1 blocks (one every d tokens), and a step holds at most min(size, max_seqs)
        sequences."""
        return size // self.runner.cfg.cmp_stride + min(size, self.max_seqs)

    def max_old(self, size: int) -> int:
        """Independent K/V: most old rows φ's flat source holds in a step of `size` tokens. A
        sequence's first new summary starts at most l − 1 tokens before the step (it was not
        complete before it), so each of at most min(size, max_seqs) sequences reads ≤ l − 1 rows
        from its ring."""
        return min(size, self.max_seqs) * (self.runner.cfg.cmp_block - 1)

    def eligible(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def size_for(self, num_tokens: int) -> int:
        """The padded size a step of `num_tokens` (eligible) tokens runs at."""
        return next(s for s in self.sizes if s >= num_tokens)

    # -- inputs -----------------------------------------------------------------------------------
    def _layout(self, size: int):
        r = self.runner
        P, E, l, trash = r.P, r.E, r.cfg.cmp_block, r.trash_page
        ne = self.max_entries(size)
        i64 = torch.int64
        out = [("ids", i64, (size,), 0), ("pos", i64, (size,), 0), ("slots", i64, (size,), trash * P),
               ("entry_slots", i64, (ne,), trash * E)]
        if r.shared:  # φ reads each block's l token slots from the pages
            return out + [("block_slots", i64, (ne, l), trash * P)]
        # Independent K/V: φ's flat source [old rows from its ring ; the step's rows] and the two
        # rings' writes (padding: row 0 into the trash page).
        return out + [("old_slots", i64, (self.max_old(size),), trash * P), ("entry_src", i64, (ne, l), 0),
                      ("cmp_rows", i64, (size,), 0), ("cmp_slots", i64, (size,), trash * P),
                      ("win_rows", i64, (size,), 0), ("win_slots", i64, (size,), trash * P)]

    def new_inputs(self, size: int, device=None, pin: bool = False) -> StepInputs:
        return StepInputs(self._layout(size), device=device, pin=pin)

    def upload(self, size: int | None = None, **arrays) -> StepInputs:
        """The step's per-token and per-entry indices (numpy, by the names of `_layout`: ids, pos,
        slots, entry_slots, and block_slots with shared K/V, else old_slots, entry_src and the
        rings' rows and slots), padded to the next size and moved to that size's device inputs (one
        copy from a pinned staging buffer on CUDA); returns the device inputs, whose first rows are
        the step's."""
        if size is None:
            size = self.size_for(len(arrays["ids"]))
        layout = self._layout(size)
        if set(arrays) != {name for name, _, _, _ in layout}:
            raise ValueError(f"piecewise inputs are {[n for n, _, _, _ in layout]}, got {sorted(arrays)}")
        dev = self._dev.get(size)
        if dev is None:
            dev = self._dev[size] = self.new_inputs(size, device=self.runner.device)
        host = dev if dev.flat.device.type == "cpu" else self._staging.take(size)
        for name, _, shape, pad in layout:
            src, a = arrays[name], host[name].numpy()
            if len(src) > shape[0]:
                raise AssertionError(f"{len(src)} {name} rows do not fit a padded step's {shape[0]}")
            a[:len(src)] = src
            a[len(src):] = pad
        if host is not dev:
            dev.copy_(host)
            self._staging.copied(host)
        return dev

    def padding(self, size: int) -> StepInputs:
        """All-padding device inputs of a size (what capture runs on: every write hits the trash page)."""
        return self.upload(size=size, **{name: np.zeros((0, *shape[1:]), dtype=np.int64)
                                         for name, _, shape, _ in self._layout(size)})

    # -- the pieces -------------------------------------------------------------------------------
    def _piece(self, i: int, x: StepInputs, state: dict) -> None:
        """Piece i of a step over the padded inputs x (see the module docstring); `state` carries
        piece 0's RoPE tables to the later pieces."""
        r = self.runner
        model, write = r.model, r.write_pair
        size = x["ids"].shape[0]
        h, q_out, g_out, o = self.h[:size], self.q[:size], self.gates[:size], self.o[:size]
        if i == 0:
            hh = model.embed(x["ids"])
            state["rope"] = model.layers[0].attn.rope(x["pos"], hh)
            a = model.layers[0].attn_norm(hh)
        else:
            prev = model.layers[i - 1]
            hh, a = add_rms_norm(h, prev.attn.output(o), prev.mlp_norm)
            pending = prev.mlp.forward_fused(a)
            if i == len(model.layers):
                torch.add(hh, pending, out=h)
                return
            hh, a = add_rms_norm(hh, pending, model.layers[i].attn_norm)
        layer, cache = model.layers[i], r.caches[i]
        q, kv, gates = layer.attn.project_and_gate(a, x["pos"], state["rope"],
                                                   write=(cache.k_cache, cache.v_cache, x["slots"], write))
        if not r.dense and not r.shared:  # φ over its flat source (old rows read before the rings' writes)
            r.write_summaries(layer.attn, cache, kv["cmp"], x["old_slots"], x["entry_src"], x["entry_slots"])
        elif not r.dense:  # after the step's own writes: φ reads every block from the pages
            pair = layer.attn.has_phi_pair
            gather = block_gather(x["block_slots"], r.P, h.device, pair)
            # φ's products as the eager step computes them, not the decode kernel `phi_write_pair`:
            # that kernel's rounding differs, and on a small random model the summaries' selection
            # then flipped often enough to move hidden states by 9–19 % of their largest value
            # against the eager step; this way the two agree exactly (H200, bf16, the test model).
            summaries_from_cache(r, layer.attn, cache, x["block_slots"], x["entry_slots"], gather, pair, False)
        if not r.shared:
            r.write_rings(cache, kv, x["cmp_rows"], x["cmp_slots"], x["win_rows"], x["win_slots"])
        h.copy_(hh)
        q_out.copy_(q)
        g_out.copy_(gates)

    @torch.inference_mode()
    def forward(self, inp) -> torch.Tensor:
        """Hidden states [T, hidden] after the last layer (before the final norm) for the step
        `inp` (a StepInputs of model_runner whose `piecewise` holds the padded device inputs)."""
        r = self.runner
        x = inp.piecewise
        T, L = inp.cu_host[-1], len(r.model.layers)
        graphs = self.graphs.get(x["ids"].shape[0])
        if graphs is not None and len(graphs) != L + 1:  # precompile runs one layer: eager
            graphs = None
        state = {}
        self.steps += 1
        rows = inp.piecewise_decode  # the decode rows' padded inputs, when the step has any
        chunks = inp.piecewise_prefill  # the size whose static plan holds the step's chunks, if so
        if rows is not None:
            self.decode_rows.steps += 1
        if chunks is not None:
            self.prefill_rows.steps += 1
        for i in range(L + 1):
            if graphs is not None:
                graphs[i].replay()
            else:
                self._piece(i, x, state)
            if i < L:  # the layer's attention, into the buffer the next piece reads: the decode
                # rows' from their graph, then the chunks' (their graph or the eager call), which
                # overwrites the decode graph's throwaway rows past the decode rows
                if rows is not None:
                    self.decode_rows.attend(i, rows)
                if chunks is not None:
                    self.prefill_rows.attend(i, chunks)
                else:
                    r.attention(self.q[:T], self.gates[:T], r.caches[i], inp, out=self.o[:T],
                                decode_done=rows is not None)
        return self.h[:T]

    # -- CUDA graphs ------------------------------------------------------------------------------
    def capture(self) -> None:
        """One graph per piece and size, over all-padding inputs (their writes go to the trash
        page), largest size first, in one memory pool."""
        dev = self.runner.device
        pool = None
        n = len(self.runner.model.layers) + 1
        for size in reversed(self.sizes):
            x = self.padding(size)
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(2):  # compile / autotune outside the capture
                    state = {}
                    for i in range(n):
                        self._piece(i, x, state)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graphs, state = [], self._graph_state.setdefault(size, {})
            for i in range(n):
                g = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(g, pool=pool):
                    self._piece(i, x, state)
                pool = g.pool()
                graphs.append(g)
            self.graphs[size] = graphs
        if self.decode_rows is not None:
            pool = self.decode_rows.capture(pool)
        if self.prefill_rows is not None:
            self.prefill_rows.capture(pool)
        torch.cuda.synchronize(dev)
        log.info("captured piecewise CUDA graphs for prompt steps of %s tokens (%d pieces each); attention "
                 "graphs for decode rows: %s, for prompt chunks: steps of %s tokens", self.sizes, n,
                 self.decode_rows.sizes if self.decode_rows is not None else "none",
                 sorted(self.prefill_rows.plans) if self.prefill_rows is not None else "none")
