"""Start-up compilation of the Triton kernel variants a server's eager steps can meet (CUDA only).

Triton compiles a kernel the first time a launch has a new specialisation: the decode kernels per
count of decode rows beside a prompt chunk and per table-width class, the prefill top-n per power
of two of the context's blocks, strides that do or do not divide by 16. A cold server paid those
compiles inside its first requests' TTFTs: ~10 s over the first 8 × 64k requests on an H200
(docs/benchmarks/engine.md, tenth session). Decode-only steps replay CUDA graphs captured in
`LLMEngine.warmup`, and so do prompt steps of up to `piecewise_max_tokens` tokens (their
attention too where piecewise_prefill / piecewise_decode hold it), so the eager path is what is left
to cover: steps with a longer prompt chunk, alone or beside decode rows. The synthetic steps are
short, so they run with the runner's piecewise graphs set aside (`eager_path`): through the graphs
they met no eager launch at all, and an H100 (2026-12-05) compiled the selected-branch kernel for
16k, 32k and 64k contexts, and decode kernels beside them, inside its first 64k requests.

With speculative decoding a sequence verifying k drafts is 1 + k decode rows, so steps carry more
rows than sequences; the plan then covers row counts up to `decode_rows_bound` (nsa_kernels:
past it the decode launchers' sizing no longer changes with the batch), docs/engine.md.

`precompile` runs synthetic steps through the real `ModelRunner.execute` — the same launchers,
shapes and strides as served steps — while every Triton launch only compiles (`compile_only`),
in a thread pool when this Triton has `AsyncCompileMode` (its API for compiling kernels in
parallel; how much the threads overlap was not measured on its own). Nothing is launched, so the
steps cost host time only and their outputs are never read; the synthetic sequences' pages all
point at the runner's trash page, which no request owns. Compiled kernels land in Triton's
in-memory and on-disk caches, where served steps find them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nsa_kernels.reference import num_compressed

from .model_runner import ModelRunner, table_width
from .protocol import SamplingParams
from .sequence import Sequence

log = logging.getLogger("nsa_serve.engine")

# Prompt-chunk lengths of the synthetic steps, at most: one multiple of 16 and one not (Triton
# specialises integer arguments on divisibility by 16).
CHUNKS = (64, 71)


@dataclass(frozen=True)
class Step:
    """One synthetic step: `decode` sequences of `pages` pages (one new token each) beside one
    prompt chunk of `chunk` tokens ending at token `context`."""
    decode: int
    pages: int
    chunk: int
    context: int


def width_classes(max_pages: int) -> list[int]:
    """Every block-table width an eager step can have (`model_runner.table_width`)."""
    out, w = [], table_width(1)
    while w <= table_width(max_pages):
        out.append(w)
        w *= 2
    return out


def pages_of_width(width: int, max_pages: int) -> int:
    """A page count whose table has `width` columns, within `max_pages` where the class allows."""
    return max(1, min(width, max_pages))


def chunk_lengths(max_chunk: int) -> list[int]:
    """CHUNKS within the engine's largest prompt chunk (the window ring is sized for it), keeping
    one length that divides by 16 and one that does not where the cap allows; ≥ 2 (one new token
    is a decode row)."""
    a = max(2, min(CHUNKS[0], max_chunk // 16 * 16 or max_chunk))
    b = max(2, min(CHUNKS[1], max_chunk))
    if b % 16 == 0 and b > 2:
        b -= 1
    return sorted({a, b})


def plan(max_decode_rows: int, max_model_len: int, page_size: int, max_chunk: int) -> list[Step]:
    """The synthetic steps: every decode-row count 1 … max_decode_rows beside a short prompt chunk,
    for every table-width class up to max_model_len; then prompt chunks whose context covers every
    power-of-two class of blocks, each with block counts w, w − 1, w − 2, w − 4, w − 8 (the prefill
    kernels' score strides, kv heads × blocks, then fall in every class of divisibility by 16 for
    1–16 kv heads), alone and after one decode row (a prompt chunk's q and gates are then offset
    by a row: Triton specialises pointers on 16-byte alignment)."""
    max_pages = -(-max_model_len // page_size)
    chunks = chunk_lengths(min(max_chunk, max_model_len))
    small = chunks[0]
    steps = [Step(b, pages_of_width(w, max_pages), small, small)
             for w in width_classes(max_pages) for b in range(1, max_decode_rows + 1)]
    seen = set()
    for w in width_classes(max_pages):
        for blocks in (w, w - 1, w - 2, w - 4, w - 8):
            for chunk in chunks:
                context = min(max(blocks, 1) * page_size, max_model_len)
                chunk = min(chunk, context)
                for decode in ((0, 1) if max_decode_rows else (0,)):
                    step = Step(decode, decode, chunk, context)
                    if step not in seen:
                        seen.add(step)
                        steps.append(step)
    return steps


def compile_threads() -> int:
    """Threads of the compile pool by default: one a core, at most 16."""
    return min(16, os.cpu_count() or 1)


@contextlib.contextmanager
def compile_only(threads: int | None = None):
    """Inside, a Triton launch compiles its kernel (in a pool of `threads`, default
    `compile_threads()`, when Triton has AsyncCompileMode) and returns without running it. On exit
    every compile has finished (or raised). Triton is imported here, not at module level: a CPU
    install may not have it."""
    import triton

    threads = threads or compile_threads()

    from nsa_kernels._triton_utils import jit_launches_replaced

    def wrap(run):
        def compile_run(self, *args, grid, warmup, **kwargs):
            return run(self, *args, grid=grid, warmup=True, **kwargs)
        return compile_run

    async_mode = getattr(triton, "AsyncCompileMode", None)
    with contextlib.ExitStack() as stack:
        if async_mode is not None and threads > 1:
            pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="triton-compile"))
            stack.enter_context(async_mode(pool))
        stack.enter_context(jit_launches_replaced(wrap))
        yield


def synthetic_sequence(runner: ModelRunner, length: int, computed: int) -> Sequence:
    """A synthetic sequence of `length` tokens, `computed` of them cached, every page the trash page
    (which no request owns): a step over it launches what a real one at that context does, reading
    and writing one page. Also the memory profile's long-context chunk (`LLMEngine._profile_step`)."""
    c = runner.cfg
    seq = Sequence("__precompile__", 0, [1] * length, SamplingParams(max_tokens=1), 0.0)
    seq.num_computed_tokens = computed
    seq.num_summaries = 0 if runner.dense else num_compressed(computed, c.cmp_block, c.cmp_stride)
    seq.block_table = [runner.trash_page] * (-(-length // runner.P))
    if not runner.shared:
        seq.win_ring = [runner.trash_page] * runner.win_ring_pages
        seq.cmp_ring = [runner.trash_page] * runner.cmp_ring_pages
    return seq


@contextlib.contextmanager
def first_layer_only(model):
    """Inside, `model` runs its first layer only. Every layer has the same shapes, so it launches
    the same kernel variants: for compiling, one layer meets them all, at 1/num_layers of the host
    time a step."""
    layers = model.layers
    try:
        model.layers = layers[:1]
        yield
    finally:
        model.layers = layers


@contextlib.contextmanager
def eager_path(runner: ModelRunner):
    """Inside, `runner` prepares and runs every step eagerly: its piecewise graphs are set aside."""
    piecewise = runner.piecewise
    try:
        runner.piecewise = None
        yield
    finally:
        runner.piecewise = piecewise


def run_steps(runner: ModelRunner, steps: list[Step]) -> None:
    """Run the synthetic steps through `runner`'s eager path (inside `compile_only` they only compile)."""
    with first_layer_only(runner.model), eager_path(runner):
        for s in steps:
            seqs = [synthetic_sequence(runner, s.pages * runner.P, s.pages * runner.P - 1) for _ in range(s.decode)]
            seqs.append(synthetic_sequence(runner, s.context, s.context - s.chunk))
            runner.execute(runner.prepare(seqs, [1] * s.decode + [s.chunk]))


def planned_rows(max_decode_rows: int, verify_rows: int, bound: int) -> int:
    """Decode-row counts the plan covers (1 … this): `max_decode_rows`, or, where sequences
    verifying drafts make steps of up to `verify_rows` rows (each is 1 + k rows), as many of those
    as meet new kernel variants — up to `bound` (`decode_rows_bound`: past it a larger batch meets
    none), never fewer than `max_decode_rows`."""
    return max(max_decode_rows, min(verify_rows, bound))


def precompile(runner: ModelRunner, max_decode_rows: int, max_model_len: int, max_chunk: int,
               threads: int | None = None, verify_rows: int = 0) -> int:
    """Compile the kernels of every `plan` step; returns the number of steps run (0 off CUDA).
    `verify_rows`: the most decode rows a step can have with speculative decoding (0: none)."""
    if runner.device.type != "cuda":
        return 0
    if verify_rows > max_decode_rows:
        # Speculation: a step's verifying sequences are 1 + k decode rows each, beyond the
        # sequence count; without these, a server compiled decode variants at first use
        # (the bundled model's shape: 9 NSA variants above 63 rows, scripts/count_decode_variants.py).
        from nsa_kernels._triton_utils import decode_rows_bound

        bound = decode_rows_bound(runner.cfg.num_kv_heads, runner.device)
        max_decode_rows = planned_rows(max_decode_rows, verify_rows, bound)
    threads = threads or compile_threads()
    steps = plan(max_decode_rows, max_model_len, runner.P, max_chunk)
    t0 = time.perf_counter()
    with compile_only(threads):
        run_steps(runner, steps)
        t1 = time.perf_counter()
    log.info("precompile: %d synthetic steps in %.1f s, their compiles done %.1f s later (%d threads)",
             len(steps), t1 - t0, time.perf_counter() - t1, threads)
    return len(steps)
