"""The prompt chunks of a piecewise step: their NSA attention replayed as CUDA graphs.

With the decode rows' attention in graphs of its own (piecewise_decode.py), what a piecewise step
still ran eagerly was each layer's prefill call: ~480–690 µs of host time a layer (its Triton
launches, scratch allocations and checks), 7.7–11 ms of a 12–19 ms step whose GPU kernels took
2–9 ms (H200, paper-1b, 16–512-token prompts alone or beside 32 decode rows,
`scripts/piecewise_probe.py --profile`, docs/benchmarks/engine.md). The prefill kernels' grids
follow the step's chunks and contexts, so here every size of the pieces gets a *static* plan
(`nsa_kernels.nsa_prefill.static_plan`): tile lists with room for the most tiles a step of that
size can have (the unused ones have no rows), the selected-branch grid over every row (rows that
are not a chunk's, such as the decode rows, keep their output), block scores as wide as the
longest possible sequence, summaries read through the block table. Each step writes its chunks
into that layout (`static_layout`) and its chunk sequences' block tables into fixed-shape
buffers, one pinned copy; one graph per layer and size then replays the launches.

The price is on the GPU: the top-n passes run over the longest sequence's blocks, the padded
tiles and rows start and exit, and the summaries are not packed for TMA copies (that launch's
grid follows the contexts). The step's GPU kernels took 0.1–0.9 ms longer (16–512 tokens, alone
or beside 32 decode rows at 1k), which the host time saved outweighs only for small steps, so
sizes above MAX_TOKENS keep the eager call. H200, paper-1b, wall ms of the step, eager prefill
call → graphs (scripts/piecewise_probe.py, docs/benchmarks/engine.md):

  | step (padded size)                    | 1k context     | 16k context   |
  |---------------------------------------|----------------|---------------|
  | 16 / 128-token prompt (16 / 128)      | 12.7 → 3.8 / 14.0 → 4.6 | 128: 15.6 → 4.8 |
  | + 32 (16k: 8) decode rows (64 / 256)  | 14.1 → 6.4 / 10.0 → 7.3 | 128: 9.9 → 6.4  |
  | 512-token prompt (512)                | 15.0 → 9.0     |               |
  | 512 + 32 decode rows (1024)           | 12.3 → 12.8    |               |
  | 1024-token prompt (1024)              |                | 16.1 → 14.6   |
  | 1024 + 8 decode rows (2048)           |                | 18.9 → 20.2   |
  | 2000-token prompt, alone or + 32 rows | 25.3 → 26.3 / 25.1 → 26.2 |     |

NSA attention with the Triton prefill only (the dense baseline's prefill is a loop of SDPA calls
per sequence). Independent-K/V models add their window rings' tables to the inputs (fixed shape
[sequences, ring pages]; the engine sizes rings for its longest chunk). `attend` runs the same
launches uncaptured (tests under the CPU interpreter, or a size not captured).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .decode_graphs import Staging, StepInputs
from .piecewise_decode import capture_layer_graphs, fill_tables

# Padded step sizes (tokens) whose chunks replay graphs; larger steps call the prefill eagerly (the
# table above: at 1024 and 2048 the graphs were slower as often as faster).
MAX_TOKENS = 512


def available(runner) -> bool:
    """Whether a runner's prompt chunks can go this way: NSA with the Triton prefill."""
    from nsa_kernels.nsa_sdpa import paged_nsa_prefill_sdpa

    att = runner.attention
    return not runner.dense and att.prefill_plan_fn is not None and att.prefill_fn is not paged_nsa_prefill_sdpa


class PrefillRows:
    def __init__(self, runner, q: torch.Tensor, gates: torch.Tensor, o: torch.Tensor, sizes: list[int],
                 max_seqs: int, max_model_len: int):
        from nsa_kernels.nsa_prefill import static_layout, static_plan

        self._layout_fn = static_layout
        self.runner = runner
        self.q, self.gates, self.o = q, gates, o
        self.max_pages = math.ceil(max_model_len / runner.P)
        c = runner.cfg
        self.plans = {s: static_plan(s, min(s, max_seqs), self.max_pages, page_size=runner.P,
                                     group=c.num_heads // c.num_kv_heads, device=runner.device)
                      for s in sizes if s <= MAX_TOKENS}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (layer, size) → graph
        self.steps = 0  # steps whose chunks went this way (for tests and logs)
        self._dev: dict[int, StepInputs] = {}
        self._staging = Staging(self, pinned=runner.device.type == "cuda")
        for s, plan in self.plans.items():
            # The plan reads its layout from the size's device inputs: the step's copy refills it.
            dev = self._dev[s] = self.new_inputs(s, device=runner.device)
            dev["meta"].copy_(plan.meta)
            dev["tables"].fill_(runner.trash_page)
            if "win_tables" in dev:
                dev["win_tables"].fill_(runner.trash_page)
            plan.meta = dev["meta"]

    def serves(self, size: int) -> bool:
        """Whether steps of this padded size take their chunks' attention from here."""
        return size in self.plans

    # -- inputs -----------------------------------------------------------------------------------
    def _layout_of(self, size: int):
        plan, r = self.plans[size], self.runner
        out = [("meta", torch.int32, (plan.meta.numel(),), 0),
               ("tables", torch.int32, (plan.static[1], self.max_pages), r.trash_page)]
        if not r.shared:  # independent K/V: the window rings' tables (rings hold w + chunk − 1 tokens)
            out.append(("win_tables", torch.int32, (plan.static[1], r.win_ring_pages), r.trash_page))
        return out

    def new_inputs(self, size: int, device=None, pin: bool = False) -> StepInputs:
        return StepInputs(self._layout_of(size), device=device, pin=pin)

    def upload(self, size: int, tables: np.ndarray, cu: list[int], lens: list[int], first: int,
               win_tables: np.ndarray | None = None) -> StepInputs:
        """The chunks of sequences first … B−1 of the step (rows cu[first] … of q; block tables
        numpy [B, width], host cu [B+1] and lengths; independent K/V: window-ring tables [B, ring
        pages]) into the size's plan layout and tables."""
        dev = self._dev[size]
        host = dev if dev.flat.device.type == "cpu" else self._staging.take(size)
        base = cu[first]
        self._layout_fn(self.plans[size], [c - base for c in cu[first:]], lens[first:], base,
                        out=host["meta"].numpy())
        fill_tables(host, tables[first:len(lens)], self.max_pages, self.runner.trash_page,
                    None if win_tables is None else win_tables[first:len(lens)])
        if host is not dev:
            dev.copy_(host)
            self._staging.copied(host)
        return dev

    # -- the step ---------------------------------------------------------------------------------
    def attend(self, layer: int, size: int) -> None:
        """Layer `layer`'s attention of the chunks `upload` laid out, into their rows of `o`."""
        graph = self.graphs.get((layer, size))
        if graph is not None:
            graph.replay()
        else:
            self._run(layer, size)

    def _run(self, layer: int, size: int) -> None:
        from nsa_kernels.nsa_prefill import nsa_prefill_static

        r = self.runner
        x = self._dev[size]
        nsa_prefill_static(self.q[:size], self.gates[:size], r.caches[layer], x["tables"], r.attention.p,
                           self.plans[size], self.o[:size], win_tables=x.get("win_tables"))

    # -- CUDA graphs ------------------------------------------------------------------------------
    def capture(self, pool=None):
        """One graph per layer and size, over layouts with no chunk (nothing is written), in
        `pool`; returns the pool."""
        return capture_layer_graphs(self.runner, list(self.plans), self._run, self.graphs, pool)
