"""The decode rows of a piecewise step: their attention replayed as CUDA graphs.

A piecewise step (piecewise_graphs.py) replays everything but attention from graphs and calls
attention eagerly between the pieces. When decode rows share the step with a prompt chunk, each
layer made two eager calls: the decode kernels for the single-token rows, the prefill kernels
for the chunk. The decode call alone was ~440 µs of host time a layer (its Triton launches and
~20 scratch allocations): 7.0 of a 19.1 ms step for 32 rows at 1k beside a 128-token prompt,
whose GPU kernels took 3.9 ms in all (H200, paper-1b, `scripts/piecewise_probe.py --profile`,
docs/benchmarks/engine.md). The decode kernels are capturable (the decode graphs replay them),
so here each layer's decode-row attention is one graph per padded row count (1, 2, 4, …) and the
eager call is left with the chunk.

Inputs are padded as in decode_graphs.py: rows past the step's decode rows have length 1 and a
block table of the trash page, and tables have the width of the longest possible sequence. The
graph reads q and the gates from the first rows of the pieces' shared buffers and writes the
first rows of their attention output. Rows past the decode rows hold the chunk's (or padding)
queries: their outputs are thrown away, because the eager prefill call runs after the graph and
writes every chunk row.

`attend` runs the same computation eagerly where nothing is captured (CPU, where the tests
compare it with the eager step; or a size not captured).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .decode_graphs import Staging, StepInputs, decode_attention, graph_sizes


class DecodeRows:
    def __init__(self, runner, q: torch.Tensor, gates: torch.Tensor, o: torch.Tensor, max_rows: int,
                 max_model_len: int):
        """q, gates, o: the pieces' shared buffers (rows ≥ max_rows); at most `max_rows` decode rows
        a step."""
        if max_rows > q.shape[0]:
            raise ValueError(f"{max_rows} decode rows do not fit the pieces' {q.shape[0]}-row buffers")
        self.runner = runner
        self.q, self.gates, self.o = q, gates, o
        self.max_rows = max_rows
        self.sizes = graph_sizes(max_rows)
        self.max_pages = math.ceil(max_model_len / runner.P)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (layer, size) → graph
        self.steps = 0  # steps whose decode rows went this way (for tests and logs)
        self.capture_bytes = 0  # GPU memory the capture reserved
        self._dev: dict[int, StepInputs] = {}
        self._staging = Staging(self, pinned=runner.device.type == "cuda")

    # -- inputs -----------------------------------------------------------------------------------
    def _layout(self, size: int):
        r = self.runner
        out = [("tables", torch.int32, (size, self.max_pages), r.trash_page), ("lens", torch.int32, (size,), 1)]
        if not r.shared:  # independent K/V: the window rings' tables
            out.append(("win_tables", torch.int32, (size, r.win_ring_pages), r.trash_page))
        return out

    def new_inputs(self, size: int, device=None, pin: bool = False) -> StepInputs:
        return StepInputs(self._layout(size), device=device, pin=pin)

    def upload(self, tables: np.ndarray, lens, rows: int, size: int | None = None,
               win_tables: np.ndarray | None = None) -> StepInputs:
        """The first `rows` rows of the step's block tables (numpy [B, width], decode rows first)
        and lengths (and, independent K/V, window-ring tables [B, ring pages]), padded to the next
        size (or `size`) and moved to that size's device inputs."""
        if size is None:
            size = next(s for s in self.sizes if s >= rows)
        dev = self._dev.get(size)
        if dev is None:
            dev = self._dev[size] = self.new_inputs(size, device=self.runner.device)
        host = dev if dev.flat.device.type == "cpu" else self._staging.take(size)
        fill_tables(host, tables[:rows], self.max_pages, self.runner.trash_page,
                    None if win_tables is None else win_tables[:rows])
        n = host["lens"].numpy()
        n[:rows] = lens[:rows]
        n[rows:] = 1
        if host is not dev:
            dev.copy_(host)
            self._staging.copied(host)
        return dev

    # -- the step ---------------------------------------------------------------------------------
    def attend(self, layer: int, x: StepInputs) -> None:
        """Layer `layer`'s attention of the decode rows into the first rows of `o` (x: `upload`'s)."""
        size = x["lens"].shape[0]
        graph = self.graphs.get((layer, size))
        if graph is not None:
            graph.replay()
        else:
            self._run(layer, x)

    def _run(self, layer: int, x: StepInputs) -> None:
        size = x["lens"].shape[0]
        r = self.runner
        out = decode_attention(r, self.q[:size], self.gates[:size], r.caches[layer], x["tables"], x["lens"],
                               x.get("win_tables"))
        self.o[:size].copy_(out)

    # -- CUDA graphs ------------------------------------------------------------------------------
    def capture(self, pool=None):
        """One graph per layer and size over all-padding inputs, in `pool`; returns the pool."""
        dev = self.runner.device
        empty = np.zeros((0, 1), dtype=np.int32)
        reserved = torch.cuda.memory_reserved(dev)
        # every row padding: length 1 over the trash page
        inputs = {size: self.upload(empty, [], 0, size=size, win_tables=empty) for size in self.sizes}
        pool = capture_layer_graphs(self.runner, self.sizes, lambda i, size: self._run(i, inputs[size]),
                                    self.graphs, pool)
        self.capture_bytes = torch.cuda.memory_reserved(dev) - reserved  # for logs and the probe
        return pool


def fill_tables(host: StepInputs, rows: np.ndarray, max_pages: int, trash: int,
                win_rows: np.ndarray | None = None) -> None:
    """host["tables"] (fixed shape [size, max_pages]) = `rows` (numpy [n, width]) on top, the
    trash page everywhere else; likewise host["win_tables"] = `win_rows` (independent K/V: the
    same sequences' window-ring tables, all of one width) where the layout has it. Only the columns an earlier step wrote are reset: the full width is
    the longest possible sequence's (2048 columns at 128k), a step's rows need its own table width
    (`host.table_cols` holds that column count between steps). No sequence has more than
    max_pages pages, though the step's table may be wider (a power of two)."""
    t = host["tables"].numpy()
    if host.table_cols is None:
        t.fill(trash)
    else:
        t[:, :host.table_cols] = trash
    w = min(rows.shape[1], max_pages)
    t[:rows.shape[0], :w] = rows[:, :w]
    host.table_cols = w
    if "win_tables" in host:
        wt = host["win_tables"].numpy()
        wt[:rows.shape[0]] = win_rows
        wt[rows.shape[0]:] = trash


def capture_layer_graphs(runner, sizes, run, graphs: dict, pool=None):
    """graphs[(layer, size)] = a CUDA graph of run(layer, size), for every layer and size (largest
    first), all in `pool`; each size runs twice uncaptured on a side stream first (Triton compiles
    and autotunes outside the capture). Returns the pool."""
    dev = runner.device
    layers = len(runner.model.layers)
    for size in sorted(sizes, reverse=True):
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                for i in range(layers):
                    run(i, size)
        torch.cuda.current_stream(dev).wait_stream(stream)
        for i in range(layers):
            g = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(g, pool=pool):
                run(i, size)
            pool = g.pool()
            graphs[(i, size)] = g
    return pool
