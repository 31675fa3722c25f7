"""The synchronous engine: requests in, one `step()` at a time, RequestOutputs out.

step = drain adds/aborts → scheduler.schedule() → runner.prepare/execute → sampler →
bookkeeping (pages, prefix cache, stop conditions, detokenizer) → outputs for the requests that
moved. The async engine (async_engine.py) calls `step()` in a worker thread; tests and the
offline benchmark call it directly.

With `EngineArgs.async_scheduling`, a graph decode step is launched before the previous one's
tokens are read, and `step()` returns the previous step's outputs (docs/engine.md, "Async
scheduling"): launch this step → read the previous tokens → bookkeeping of both.

Thread contract: `add_request`, `abort_request` and `stats` may be called from another thread
while `step` runs; they only touch lock-protected pending lists and the stats snapshot.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nsa_kernels.reference import num_compressed, tokens_read_per_step

from ..model.nsa_model import NSAModel
from .args import EngineArgs
from .bad_words import bad_word_token_ids, depends_on_output
from .block_manager import BlockManager
from .decode_graphs import StaticDecode
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .model_runner import ModelRunner, cache_bytes_per_page, ring_pages
from .ngram import NgramProposer
from .piecewise_graphs import PiecewiseSteps
from .precompile import precompile, synthetic_sequence
from .protocol import (CompletionOutput, EngineStats, InvalidRequestError, PromptTooLongError, QueueFullError,
                       RequestMetrics, RequestOutput, SamplingParams, TokenLogprob)
from .sampler import PendingSample, SampleResult, Sampler, generator_states, has_penalty, restore_generators
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .speculative import accepted_drafts, draft_limit
from .structured import GrammarCompiler, allowed_mask

log = logging.getLogger("nsa_serve.engine")


@dataclass(eq=False)
class _Completion:
    """Output side of one sequence: text so far and what has been streamed."""

    seq: Sequence
    detok: IncrementalDetokenizer | None
    matcher: StopStringMatcher
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    last_token_time: float | None = None
    itl: list[float] | None = None  # output kind "final_only": gaps between consecutive tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    completions: list[_Completion] = field(default_factory=list)
    # Prompt tokens already counted in prompt_tokens_total: the furthest any of its sequences has
    # prefilled (prefix-cache hits included), so n > 1 and recompute after preemption count once.
    prompt_tokens_counted: int = 0
    # params.prompt_logprobs: entry p for prompt token p (None for p = 0), filled as prefill goes
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        comps = self.completions
        if len(comps) == 1:  # the common case, asked twice per request per step
            return comps[0].seq.is_finished
        return all(c.seq.is_finished for c in comps)


@dataclass(eq=False)
class _InFlight:
    """A decode step launched on the device whose tokens the host has not read (async scheduling)."""

    seqs: list[Sequence]
    pending: PendingSample
    row: dict  # Sequence → its row in pending.tokens
    entries: dict  # Sequence → (first, end) summaries written (StaticDecode.new_entries)


@dataclass
class StepTiming:
    """Where the time of the last step went (seconds), for the benchmark."""

    schedule_s: float = 0.0  # scheduler + block manager (plain Python)
    prepare_s: float = 0.0  # building the step's index tensors
    model_s: float = 0.0  # forward + sampling, synchronised on GPU
    postprocess_s: float = 0.0  # detokenizer, stop checks, outputs
    num_tokens: int = 0
    num_decode: int = 0
    num_verify: int = 0  # rows verifying drafts (speculative.py) …
    verify_tokens: int = 0  # … and their tokens (1 + k each; part of num_tokens)


def _halves(rows: list) -> list[list]:
    """A failed step's rows in two halves (a single row stays whole: it is retried alone once)."""
    if len(rows) == 1:
        return [rows]
    mid = len(rows) // 2
    return [rows[:mid], rows[mid:]]


def _prompt_entries(inp) -> dict:
    """Per sequence, (prompt position, TokenLogprob) for the prompt rows of a step (texts filled later)."""
    res = inp.prompt_result
    if res is None:
        return {}
    out, i = {}, 0
    for seq, first, count in inp.prompt_spans:
        k = seq.params.prompt_logprobs
        out[seq] = [(first + j, TokenLogprob(
            inp.prompt_targets_host[i + j], "", res.logprob[i + j],
            [(t, "", v) for t, v in zip(res.top_ids[i + j][:k], res.top_logprobs[i + j][:k])],
            rank=res.rank[i + j])) for j in range(count)]
        i += count
    return out


def resolve_device_dtype(args: EngineArgs) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif args.dtype in names:
        dtype = names[args.dtype]
    else:
        raise ValueError(f"unknown dtype {args.dtype!r}; choose auto, float32, bfloat16 or float16")
    return device, dtype


# CPU steps and threads: a step with at least this many tokens (a prefill chunk), or with a single
# sequence, uses every intra-op thread; other steps (several sequences decoding) leave
# cpu_reserved_cores to the API server, whose per-sequence work (detokenising, streaming) otherwise
# preempts intra-op threads at every parallel region. Measured with the default model on the 2-core
# CI machine (docs/benchmarks/engine.md): 4 clients, 256-token prompts: TPOT 80 → 38 ms with 1 of 2
# cores reserved; one client: a 512-token prefill chunk and a lone 8k-context decode are 1.7× and
# 1.45× faster with both threads.
CPU_BIG_STEP_TOKENS = 256


def cpu_thread_policy(args: EngineArgs) -> tuple[int, int]:
    """(threads for small steps, threads for big steps) of a CPU engine."""
    total = args.cpu_threads or torch.get_num_threads()
    return max(1, total - args.cpu_reserved_cores), total


class LLMEngine:
    def __init__(self, args: EngineArgs, model: NSAModel | None = None, tokenizer=None,
                 model_name: str | None = None):
        args.validate()
        self.args = args
        if model is None:
            from ..model.checkpoint import load_model
            from ..model.init_model import ensure_default_model
            from ..tokenizer import Tokenizer

            model_dir = Path(args.model) if args.model else ensure_default_model()
            device, dtype = resolve_device_dtype(args)
            model = load_model(model_dir, device=device, dtype=dtype)
            tok_path = model_dir / "tokenizer.model"
            tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
            model_name = model_name or model_dir.resolve().name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or "nsa-model"
        self.config = cfg = model.cfg
        self.device = next(model.parameters()).device
        # The step budget and prefill chunk defaults depend on the device (EngineArgs.resolved).
        self.args = args = args.resolved(self.device.type, cfg.shared_kv)
        self.chunk_cap = args.long_prefill_token_threshold  # the most tokens a sequence computes a step

        num_pages = args.num_pages or self._size_page_pool()
        self.runner = ModelRunner(model, num_pages, args.attention, self._max_chunk())
        self.block_manager = BlockManager(
            num_pages, cfg.select_block, cfg.select_block // cfg.cmp_stride, cfg.cmp_block - cfg.cmp_stride,
            self.runner.win_ring_pages, self.runner.cmp_ring_pages,
            # Rings are private per sequence, so independent-K/V models cannot share prefixes.
            enable_prefix_caching=args.enable_prefix_caching and cfg.shared_kv)
        limit = args.max_model_len or cfg.max_position_embeddings
        if limit > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {limit} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        fit = self.block_manager.max_tokens_per_sequence()
        if fit < limit:
            log.warning("page pool of %d pages holds %d tokens per sequence; max_model_len lowered "
                        "from %d", num_pages, fit, limit)
            limit = fit
        if limit < 2:
            raise ValueError(f"page pool of {num_pages} pages is too small to run any request")
        self.max_model_len = limit
        # The most logprob alternatives a request may ask for (--max-logprobs; -1: the vocabulary).
        self.max_logprobs = cfg.vocab_size if args.max_logprobs == -1 else min(args.max_logprobs, cfg.vocab_size)
        att = self.runner.attention
        if self.device.type == "cuda" and not args.enforce_eager and (
                att.dense_decode_fn if args.attention == "dense" else att.decode_fn) is not None:
            # Decode-only steps run with fixed shapes and are captured as CUDA graphs in warmup().
            # (rows: a sequence verifying k drafts is 1 + k of them, model_runner.py)
            rows = args.max_num_seqs * (1 + args.num_speculative_tokens)
            self.runner.static_decode = StaticDecode(self.runner, min(rows, 256), self.max_model_len)
        if self.device.type == "cuda" and not args.enforce_eager and args.piecewise_max_tokens:
            # Other steps replay their work as graphs captured in warmup() (piecewise_graphs.py).
            self.runner.piecewise = PiecewiseSteps(
                self.runner, min(args.piecewise_max_tokens, args.max_num_batched_tokens), args.max_num_seqs,
                self.max_model_len, decode_queries=1 + args.num_speculative_tokens)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   args.long_prefill_token_threshold, args.scheduling_policy)
        self.proposer = None
        if args.num_speculative_tokens:
            if not cfg.shared_kv:
                # A verification step writes its rejected rows into the per-sequence rings, over
                # rows the next step's window and summaries still read.
                raise ValueError("speculative decoding needs a model with shared K/V; this one has "
                                 "independent K/V per branch")
            self.proposer = NgramProposer(args.num_speculative_tokens, args.prompt_lookup_min,
                                          args.prompt_lookup_max)
        stop_ids = tokenizer.stop_token_ids if tokenizer is not None else [cfg.eos_token_id]
        self.eos_token_ids = stop_ids
        self.sampler = Sampler(cfg.vocab_size, stop_ids, seed=args.seed)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size)
        self.requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._pending_add: list[Request] = []
        self._pending_abort: list[str] = []
        self._unstarted: set[str] = set()  # admitted to the queue, not yet scheduled (for max_queue)
        self._cpu_threads = cpu_thread_policy(args) if self.device.type == "cpu" else None
        self._counters = EngineStats(num_pages_total=num_pages)
        self._stats = EngineStats(num_pages_total=num_pages)
        self.last_timing = StepTiming()
        self._inflight: _InFlight | None = None  # async scheduling: the step whose tokens are unread

    # -- sizing -----------------------------------------------------------------------------------
    def _size_page_pool(self) -> int:
        per_page = cache_bytes_per_page(self.config, next(self.model.parameters()).dtype)
        if self.device.type != "cuda":
            return max(1, int(self.args.cpu_kv_cache_gb * (1 << 30) // per_page))
        # GPU: measure the activation peak of a full-budget step on a scratch pool, then give the
        # cache what is left of `gpu_memory_utilization` of the device. Blocks torch's allocator holds
        # but no tensor uses (a previous engine's cache, in a process that builds engines in turn)
        # would count as used: give them back to the driver first.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._profile_step()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        budget = total * self.args.gpu_memory_utilization - (total - free) - peak
        pages = int(budget // per_page)
        if pages < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache (need {per_page} bytes per page, "
                               f"{budget / 2**30:.2f} GiB available); lower max_num_batched_tokens or "
                               "raise gpu_memory_utilization")
        log.info("page pool: %d pages (%.2f GiB), activation peak %.2f GiB", pages,
                 pages * per_page / 2**30, peak / 2**30)
        return pages

    def _max_chunk(self) -> int:
        """The most tokens one sequence computes in a step."""
        return self.chunk_cap

    def _profile_step(self) -> None:
        """One full-budget step of prompt chunks on a scratch pool (memory profile / warm-up):
        max_num_batched_tokens tokens as sequences of one chunk each (chunks never exceed the cap).

        The first chunk ends at the longest context a request may have (max_model_len), its
        cached tokens all on the scratch pool's trash page (`synthetic_sequence`): a chunk's
        attention scratch grows with its context (NSA prefill's block scores, ~0.3 GB for an 8k
        chunk at 128k for the paper shape; dense prefill's per-group K/V copies, ~1.6 GB), and a
        step of fresh prompts alone never showed it — the dense server ran out of memory starting on
        an 80 GB H100 when those copies were 7 GB (docs/benchmarks/engine.md, forty-second session)."""
        cfg = self.config
        budget = min(self.args.max_num_batched_tokens, self.args.max_num_seqs * self._max_chunk())
        longest = min(self.args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        chunk = min(self._max_chunk(), longest)
        sizes = [min(chunk, budget - i) for i in range(0, budget, chunk)]
        per_seq = math.ceil(chunk / cfg.select_block) + sum(ring_pages(cfg, self._max_chunk()))
        runner = ModelRunner(self.model, per_seq * len(sizes), self.args.attention, self._max_chunk())
        bm = BlockManager(runner.num_pages, cfg.select_block, cfg.select_block // cfg.cmp_stride,
                          cfg.cmp_block - cfg.cmp_stride, runner.win_ring_pages, runner.cmp_ring_pages, False)
        gen = torch.Generator().manual_seed(0)
        seqs = [synthetic_sequence(runner, longest, longest - sizes[0])]
        for i, n in enumerate(sizes[1:], 1):
            prompt = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
            seqs.append(Sequence(f"profile-{i}", 0, prompt, SamplingParams(max_tokens=1), time.time()))
            bm.admit(seqs[-1], n)
        runner.execute(runner.prepare(seqs, sizes))
        del runner

    def warmup(self) -> None:
        """One short step end to end, so the first request does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        n = min(8, self.max_model_len - 1)
        req_id = "__warmup__"
        self.add_request(req_id, list(range(3, 3 + n)), SamplingParams(max_tokens=1, temperature=0))
        while self.has_unfinished_requests():
            self.step()
        static = self.runner.static_decode
        if static is not None and not static.graphs:
            try:
                static.capture()
            except Exception:  # a failed capture costs speed, not correctness
                log.exception("CUDA graph capture failed; decode runs eagerly")
                self.runner.static_decode = None
        pw = self.runner.piecewise
        if pw is not None and not pw.graphs:
            try:
                pw.capture()
            except Exception:  # as above: prompt steps run eagerly
                log.exception("piecewise CUDA graph capture failed; prompt steps run eagerly")
                self.runner.piecewise = None
        log.info("warm-up: first step and CUDA graphs took %.1f s", time.perf_counter() - t0)
        if self.args.precompile:
            # Eager steps only: decode-only steps replay the graphs captured above (when there are
            # none, every decode-row count can be eager).
            rows = self.args.max_num_seqs - (1 if self.runner.static_decode is not None else 0)
            k = self.args.num_speculative_tokens
            precompile(self.runner, rows, self.max_model_len, self._max_chunk(),
                       verify_rows=self.args.max_num_seqs * (1 + k) if k else 0)
        lengths = self.warmup_prompt_lengths()
        if lengths:
            t0 = time.perf_counter()
            self._run_warmup_prompts(lengths)
            log.info("warm-up over contexts up to %d tokens (%d prompts) took %.1f s", max(lengths),
                     len(lengths), time.perf_counter() - t0)
        # Warm-up traffic is not user traffic: start the counters from zero.
        self._counters = EngineStats(num_pages_total=self.block_manager.num_pages)
        self.block_manager.prefix_queries = self.block_manager.prefix_hits = 0
        self._publish_stats()

    WARMUP_NEW_TOKENS = 16

    def warmup_prompt_lengths(self) -> list[int]:
        """Prompt lengths of the start-up warm-up (`EngineArgs.warmup_context`): one short prompt per
        power of two below a prefill chunk (the prefill top-n is compiled per power of two of the
        context's blocks, and lengths that are not multiples of 16 get their own variants: + 7), and
        two long ones, whose chunks walk every larger context class; each generates
        WARMUP_NEW_TOKENS tokens, so decode steps also run beside other requests' prefill chunks (the
        eager decode variants) and, at the end, alone (the CUDA graphs)."""
        limit = min(self.args.warmup_context, self.max_model_len) - self.WARMUP_NEW_TOKENS
        if limit < 1:
            return []
        chunk = self._max_chunk()
        lengths = []
        k = 16
        while k + 7 < min(limit, chunk):
            lengths.append(k + 7)
            k *= 2
        lengths += sorted({min(limit, limit // 2 + 7), limit})
        return lengths

    def _run_warmup_prompts(self, lengths: list[int]) -> None:
        """Random prompts of these lengths through the real scheduler, as many waiting at once as
        the queue allows; greedy, EOS ignored."""
        gen = torch.Generator().manual_seed(self.args.seed)
        params = SamplingParams(max_tokens=self.WARMUP_NEW_TOKENS, temperature=0, ignore_eos=True)
        todo = list(lengths)
        i = 0
        while todo or self.has_unfinished_requests():
            while todo and len(self._unstarted) < self.args.max_queue:
                n = todo.pop(0)
                prompt = torch.randint(8, self.config.vocab_size, (n,), generator=gen).tolist()
                self.add_request(f"__warmup_ctx_{i}__", prompt, params)
                i += 1
            self.step()

    # -- requests ---------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids, params: SamplingParams) -> None:
        """Raise InvalidRequestError / PromptTooLongError describing what is wrong."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams")
        params.validate(self.max_logprobs)
        V = self.config.vocab_size
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        for t in prompt_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
                raise InvalidRequestError(f"prompt token id {t!r} is not in the vocabulary [0, {V})",
                                          param="prompt")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in params.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be integers", param="stop_token_ids")
        # A stop id the model can never emit would never stop anything: a client's mistake (a
        # tokenizer mismatch, usually), said so rather than ignored.
        for name, ids in (("logit_bias", list(params.logit_bias)), ("allowed_token_ids", params.allowed_token_ids or []),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < V), None)
            if bad is not None:
                raise InvalidRequestError(f"{name} holds token id {bad!r}, outside the vocabulary [0, {V})", param=name)
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(f"this model's maximum context length is {self.max_model_len} tokens; "
                                     f"the prompt has {n} tokens, leaving no room to generate")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"this model's maximum context length is {self.max_model_len} tokens; "
                                     f"the prompt has {n} tokens and max_tokens is {params.max_tokens}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        self.validate_request(prompt_token_ids, params)
        arrival = time.time() if arrival_time is None else arrival_time
        # Structured output: the grammar is compiled here, so a bad one is a 400 before anything runs.
        matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
        if matcher is not None and params.allowed_token_ids is not None:
            first = allowed_mask(matcher, self.grammars.vocab_size)
            if not first[list(params.allowed_token_ids)].any():
                raise InvalidRequestError("allowed_token_ids leave no token the structured output allows "
                                          "as the first token", param="allowed_token_ids")
        bad = bad_word_token_ids(self.tokenizer, params.bad_words)
        if params.allowed_token_ids is not None and not set(params.allowed_token_ids) - {
                ids[0] for ids in bad if len(ids) == 1}:
            raise InvalidRequestError("bad_words ban every token of allowed_token_ids", param="bad_words")
        req = Request(request_id, list(prompt_token_ids), params, RequestMetrics(arrival_time=arrival))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        for i in range(params.n):
            seq = Sequence(request_id, i, list(prompt_token_ids), params, arrival, priority, bad_words=bad)
            if matcher is not None:
                seq.matcher = matcher if i == 0 else matcher.deep_copy()
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
                     if self.tokenizer else None)
            req.completions.append(_Completion(
                seq, detok, StopStringMatcher(params.stop, params.include_stop_str_in_output),
                itl=[] if params.output_kind == "final_only" else None))
        with self._lock:
            if request_id in self.requests or any(r.request_id == request_id for r in self._pending_add):
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            if len(self._unstarted) >= self.args.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.args.max_queue} requests); retry later")
            self._unstarted.add(request_id)
            self._pending_add.append(req)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._pending_abort.append(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._pending_add or self._pending_abort or self.requests or self._inflight)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._lock:
            adds, self._pending_add = self._pending_add, []
            aborts, self._pending_abort = self._pending_abort, []
        for req in adds:
            self.requests[req.request_id] = req
            for c in req.completions:
                self.scheduler.add(c.seq)
        for rid in aborts:
            out = self._abort(rid)
            if out is not None:
                outputs.append(out)

        t0 = time.perf_counter()
        if self.proposer is not None:
            self._propose_drafts()
        batch = self.scheduler.schedule()
        if self.proposer is not None:
            self._trim_drafts(batch)
        t1 = time.perf_counter()
        timing = StepTiming(schedule_s=t1 - t0, num_tokens=batch.num_tokens,
                            num_decode=sum(1 for n in batch.num_new_tokens if n == 1))
        if self.proposer is not None:
            verify = [n for s, n in zip(batch.seqs, batch.num_new_tokens) if n > 1 and s.num_draft]
            timing.num_verify, timing.verify_tokens = len(verify), sum(verify)
        prev, self._inflight = self._inflight, None
        if prev is not None:
            # The previous step's tokens are still on the device. Queue this step behind it when it
            # only continues those rows; then read the previous tokens while this one computes.
            nxt = self._chain(batch, prev, timing)
            t2 = time.perf_counter()
            model_s = timing.model_s
            outputs.extend(self._finalize(prev, timing))
            if nxt is not None:
                self._start(nxt)
                batch = ScheduledBatch()
            else:  # sequences that ended with the previous tokens drop out of this step
                keep = [i for i, s in enumerate(batch.seqs) if not s.is_finished]
                batch = ScheduledBatch([batch.seqs[i] for i in keep], [batch.num_new_tokens[i] for i in keep],
                                       batch.preempted)
                timing.num_tokens = batch.num_tokens
                timing.num_decode = sum(1 for n in batch.num_new_tokens if n == 1)
            timing.postprocess_s = time.perf_counter() - t2 - (timing.model_s - model_s)
        if batch.seqs:
            if self._cpu_threads is not None:
                big = batch.num_tokens >= CPU_BIG_STEP_TOKENS or len(batch.seqs) == 1
                n = self._cpu_threads[big]
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)  # per step: the engine thread's intra-op pool
            launched = self._launch_async(batch, timing)
            if launched is not None:
                self._start(launched)
            else:
                results, failed, recompute = self._execute(batch, timing)
                t2 = time.perf_counter()
                outputs.extend(self._postprocess(batch, results, failed, recompute))
                timing.postprocess_s = time.perf_counter() - t2
        self._counters.num_preemptions_total = self.scheduler.num_preemptions
        self.last_timing = timing
        self._publish_stats()
        return outputs

    # -- async scheduling -------------------------------------------------------------------------
    def _overlap_safe(self, seq: Sequence) -> bool:
        """Whether the next token of `seq` can be sampled before the host reads its last one:
        nothing in its sampling depends on the tokens themselves (a grammar, penalties, a
        min_tokens count not yet reached, a bad word of several tokens)."""
        p = seq.params
        return (seq.matcher is None and not has_penalty(p) and seq.num_output_tokens >= p.min_tokens
                and not depends_on_output(seq.bad_words))

    def _async_batch(self, batch: ScheduledBatch) -> bool:
        static = self.runner.static_decode
        return (self.args.async_scheduling and static is not None and not batch.preempted
                and static.eligible(batch.seqs, batch.num_new_tokens)
                and all(self._overlap_safe(s) for s in batch.seqs))

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """The pending token surely ends `seq` (max_tokens, context length): no row for it."""
        p = seq.params
        n_out = seq.num_tokens - seq.num_prompt_tokens
        return (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len

    def _launch_async(self, batch: ScheduledBatch, timing: StepTiming, prev: _InFlight | None = None):
        """Launch a decode-only batch without reading its tokens: an `_InFlight`, or None when the
        batch does not qualify (or the launch failed: the caller runs it synchronously)."""
        if not self._async_batch(batch):
            return None
        seqs = batch.seqs
        try:
            entries, pending, _ = self._launch_static(seqs, timing, prev)
        except Exception:
            log.exception("async decode launch failed; running the step synchronously")
            return None
        return _InFlight(list(seqs), pending, {s: i for i, s in enumerate(seqs)}, entries)

    def _launch_static(self, seqs: list[Sequence], timing: StepTiming | None, prev: _InFlight | None = None,
                       nums: list[int] | None = None):
        """Queue a decode-only step on the fixed-shape path and its sampling; nothing is read back.
        With `prev`, the input ids are the tokens `prev` sampled, gathered on the device. `nums`:
        tokens per sequence (1 each when None; a row verifying k drafts has 1 + k, each a row of
        the step, each sampled: the sampler gets the sequence once per row, as from `prepare`).
        Returns (summaries written per sequence, PendingSample, the sampled rows' sequences)."""
        static = self.runner.static_decode
        t0 = time.perf_counter()
        entries = static.new_entries(seqs, nums)
        host = static.prepare(seqs, nums)
        t1 = time.perf_counter()
        ids_from = None if prev is None else (prev.pending.tokens, [prev.row[s] for s in seqs])
        rows = seqs if nums is None else [s for s, n in zip(seqs, nums) for _ in range(n)]
        pending = self.sampler.launch(static.execute(host, len(rows), ids_from=ids_from), rows)
        if timing is not None:
            timing.prepare_s = t1 - t0
            timing.model_s = time.perf_counter() - t1
        return entries, pending, rows

    def _start(self, launched: _InFlight) -> None:
        """Bookkeeping of a launched step (its rows are computed; their next tokens are pending)."""
        self._advance(launched.seqs, [1] * len(launched.seqs), launched.entries, {}, set())
        live = [s for s in launched.seqs if not s.is_finished]
        for seq in live:
            seq.num_pending += 1
        if live:  # else every row ended with the previous tokens: nothing to read
            self._inflight = launched

    def _chain(self, batch: ScheduledBatch, prev: _InFlight, timing: StepTiming):
        """Launch `batch` behind the in-flight step `prev` when every row continues one of prev's
        sequences; rows whose pending token surely ends them are left out."""
        if not batch.seqs or any(s not in prev.row or s.num_pending != 1 for s in batch.seqs):
            return None
        rows = [i for i, s in enumerate(batch.seqs) if not self._ends_with_pending(s)]
        if not rows:
            return None
        sub = ScheduledBatch([batch.seqs[i] for i in rows], [batch.num_new_tokens[i] for i in rows])
        nxt = self._launch_async(sub, timing, prev)
        if nxt is not None:
            timing.num_tokens = timing.num_decode = len(sub.seqs)
        return nxt

    def _finalize(self, prev: _InFlight, timing: StepTiming) -> list[RequestOutput]:
        """Read an in-flight step's tokens and give them to their sequences (as `_postprocess`).
        The wait for the device counts as model time."""
        t0 = time.perf_counter()
        try:
            results = prev.pending.results()
        except Exception:  # the step failed on the device: unlike a synchronous step's, no retry
            log.exception("async decode step failed; its %d sequence(s) end with an error", len(prev.seqs))
            self._counters.num_failed_steps_total += 1
            results = None
        timing.model_s += time.perf_counter() - t0
        for seq in prev.seqs:
            if seq.num_pending:  # not for rows that ended with the step before (never pending)
                seq.num_pending -= 1
        if results is None:
            touched = {}
            for seq in prev.seqs:
                if not seq.is_finished:
                    self._finish(seq, "error")
                    touched[seq.request_id] = self.requests[seq.request_id]
            return self._emit({}, touched)
        return self._emit(dict(zip(prev.seqs, results)), {})

    def _run(self, seqs: list[Sequence], nums: list[int], timing: StepTiming | None = None):
        static = self.runner.static_decode
        if static is not None and static.eligible(seqs, nums):
            verifying = any(n != 1 for n in nums)  # rows verifying drafts: 1 + k rows a sequence
            entries, pending, rows = self._launch_static(seqs, timing, nums=nums if verifying else None)
            t1 = time.perf_counter()
            samples = pending.results()
            if timing is not None:
                timing.model_s += time.perf_counter() - t1
            if not verifying:
                return dict(zip(seqs, samples)), entries, {}
            return _by_sequence(rows, samples), entries, {}
        t0 = time.perf_counter()
        inp = self.runner.prepare(seqs, nums)
        t1 = time.perf_counter()
        logits = self.runner.execute(inp)
        prompts = _prompt_entries(inp)  # before the sampler: nothing after its draws may fail
        samples = self.sampler(logits, inp.sample_seqs)
        if timing is not None:
            timing.prepare_s = t1 - t0
            timing.model_s = time.perf_counter() - t1  # sampler's .tolist() synchronises the GPU
        return _by_sequence(inp.sample_seqs, samples), dict(zip(inp.seqs, inp.new_entries)), prompts

    def _execute(self, batch: ScheduledBatch, timing: StepTiming):
        """Run the batch; if it fails, retry it in halves, bisecting each part that fails again
        until its culprits are alone, so that only they fail: a lone culprit among B rows costs
        about 2·log2(B) retries instead of B, and a transient fault one or two.

        Returns (samples, entries, prompt logprobs), the failed sequences, and those to recompute:
        with independent K/V a failed attempt may have overwritten φ ring rows a sequence's retry
        reads (`ModelRunner.overwrites_phi_source`). Such a sequence is still retried, so that a
        culprit among them is found and ends, but if it succeeds its rows are dropped and it
        waits again for a recompute (a preemption), which rebuilds its rings exactly."""
        try:
            return self._run(batch.seqs, batch.num_new_tokens, timing), set(), set()
        except Exception:
            log.exception("engine step failed; retrying its %d sequence(s) in halves", len(batch.seqs))
            self._counters.num_failed_steps_total += 1
        # The failure may be the graph path's: the retries run eagerly, and the path stays off
        # unless they fail rows too (then those rows explain the failure, and the path comes back).
        suspect, runner = None, self.runner
        if runner.static_decode is not None and runner.static_decode.eligible(batch.seqs, batch.num_new_tokens):
            suspect = ("static_decode", runner.static_decode, "fixed-shape decode")
        elif runner.piecewise is not None and runner.piecewise.eligible(sum(batch.num_new_tokens)):
            suspect = ("piecewise", runner.piecewise, "piecewise CUDA graphs")
        if suspect is not None:
            setattr(runner, suspect[0], None)
        rows = list(zip(batch.seqs, batch.num_new_tokens))
        damaged = {s for s, n in rows if runner.overwrites_phi_source(s, n)}
        results, failed, recompute = self._retry_in_halves(rows, damaged)
        if recompute:
            log.warning("%d sequence(s) of the failed step are recomputed: the failed attempt may have "
                        "overwritten rows of their φ rings", len(recompute))
        if suspect is not None:
            attr, path, name = suspect
            if failed:
                setattr(runner, attr, path)
                log.warning("%s kept on: the failed step's culprits failed eagerly too", name)
            else:
                log.warning("%s disabled: a step failed on it and every row passed eagerly", name)
        return results, failed, recompute

    def _retry_in_halves(self, rows: list, damaged: set):
        """`_execute`'s retries of a failed step's rows [(seq, tokens)]: each part that fails is
        halved until a failing row runs alone. Rows of `damaged` sequences that pass are dropped
        and returned for a recompute. Returns ((samples, entries, prompt logprobs), failed, recompute)."""
        samples, entries, prompts, failed, recompute = {}, {}, {}, set(), set()
        todo = _halves(rows)[::-1]  # a stack: the first half is retried first
        while todo:
            part = todo.pop()
            seqs = [s for s, _ in part]
            drops = generator_states([s for s in seqs if s in damaged])
            try:  # (a failed attempt's seeded draws are undone by the sampler)
                s, e, pl = self._run(seqs, [n for _, n in part])
            except Exception:
                if len(part) == 1:
                    log.exception("request %s failed", seqs[0].request_id)
                    failed.add(seqs[0])
                else:
                    todo.extend(_halves(part)[::-1])
                continue
            for seq in seqs:
                if seq in damaged:  # its rows are dropped: so is its seeded draw
                    recompute.add(seq)
                    restore_generators({seq: drops[seq]})
                    continue
                if seq in s:
                    samples[seq] = s[seq]
                entries[seq] = e[seq]
                if seq in pl:
                    prompts[seq] = pl[seq]
        return (samples, entries, prompts), failed, recompute

    # -- speculative decoding (speculative.py) ----------------------------------------------------
    def _propose_drafts(self) -> None:
        """Draft tokens for the running sequences that may speculate, appended to their tokens
        for this step's scheduling (none while a step is in flight: their last token is unread)."""
        if self._inflight is not None:
            return
        for seq in self.scheduler.running:
            limit = draft_limit(seq, self.max_model_len)
            if limit > 0:
                drafts = self.proposer.propose(seq, limit)
                if drafts:
                    seq.token_ids.extend(drafts)
                    seq.num_draft = len(drafts)

    def _trim_drafts(self, batch: ScheduledBatch) -> None:
        """Drafts the step has no room for go: a row keeps n − 1 drafts of its n tokens; an
        unscheduled sequence keeps none (a preempted one dropped its own)."""
        n_of = dict(zip(batch.seqs, batch.num_new_tokens))
        for seq in self.scheduler.running:
            if seq.num_draft:
                seq.drop_drafts(n_of.get(seq, 1) - 1)

    def _verify_drafts(self, rows: list, samples: dict, entries: dict) -> dict:
        """Rows that verified drafts keep the accepted ones: their tokens lose the rejected drafts
        (the accepted stay until _emit appends them again as sampled tokens, so that _advance
        registers pages over the tokens computed), their row counts 1 + accepted tokens computed,
        their samples the accepted drafts and the token after them, and summaries over rejected
        tokens are dropped (made again when their block is complete). Rewrites `rows`, `samples`
        and `entries` in place; returns {seq: (drafts, accepted)}."""
        verified = {}
        c = self.config
        for i, (seq, n) in enumerate(rows):
            if not seq.num_draft:
                continue
            k = seq.num_draft
            drafts = seq.token_ids[-k:]
            got = samples.get(seq)
            if got is None:  # the row failed: it ends with an error in _advance
                seq.drop_drafts()
                continue
            a = accepted_drafts(drafts, [r.token_id for r in got])
            seq.drop_drafts(keep=a)
            samples[seq] = got[:a + 1]
            rows[i] = (seq, 1 + a)
            first, end = entries[seq]
            valid = num_compressed(seq.num_computed_tokens + 1 + a, c.cmp_block, c.cmp_stride)
            entries[seq] = (first, max(first, min(end, valid)))
            verified[seq] = (k, a)
            self._counters.spec_decode_num_drafts_total += 1
            self._counters.spec_decode_num_draft_tokens_total += k
            self._counters.spec_decode_num_accepted_tokens_total += a
        return verified

    # -- bookkeeping after a step -----------------------------------------------------------------
    def _postprocess(self, batch: ScheduledBatch, results, failed: set,
                     recompute: set) -> list[RequestOutput]:
        samples, entries, prompts = results
        for seq in recompute:
            self.scheduler.recompute(seq)
        rows = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if s not in recompute]
        verified = self._verify_drafts(rows, samples, entries) if self.proposer is not None else {}
        touched = self._advance([s for s, _ in rows], [n for _, n in rows], entries, prompts, failed, verified)
        return self._emit(samples, touched)

    def _advance(self, seqs: list[Sequence], nums: list[int], entries, prompts, failed: set,
                 verified: dict | None = None) -> dict:
        """Cache bookkeeping of computed rows (tokens, summaries, prefix pages, counters). Needs no
        sampled token: async scheduling runs it while the step is still on the device. Returns the
        requests touched (those whose rows failed). `verified`: rows that verified drafts, as
        {seq: (drafts, accepted)}; their `nums` count the accepted only (_verify_drafts)."""
        verified = verified or {}
        now = time.time()
        touched: dict[str, Request] = {}
        bm, p = self.block_manager, self.config.sparsity
        computed = 0
        for seq, n in zip(seqs, nums):
            if seq.is_finished:  # ended by the previous step's tokens while this one was in flight
                continue
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = seq.num_cached_tokens
                with self._lock:
                    self._unstarted.discard(seq.request_id)
            if seq in failed:
                self._finish(seq, "error")
                touched[req.request_id] = req
                continue
            seq.num_computed_tokens += n
            k, a = verified.get(seq, (0, 0))
            computed += n + k - a  # the rejected drafts were computed too
            # prompt_tokens_total grows as prefill progresses (chunk by chunk), not at admission: its
            # rate is prefill throughput, which is what a long-document load needs to show.
            done = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            if done > req.prompt_tokens_counted:
                self._counters.prompt_tokens_total += done - req.prompt_tokens_counted
                req.prompt_tokens_counted = done
            first, end = entries[seq]
            if end > first:
                bm.note_summaries(seq, first, end)
                seq.num_summaries = end
            bm.register_complete_pages(seq)
            if seq in prompts:
                self._add_prompt_logprobs(req, prompts[seq])
            if n == 1 or seq in verified:  # decode queries: what their attention reads, per kv group
                start = seq.num_computed_tokens - n
                for L in range(start + 1, start + 2 + k):  # a verifying row: 1 + k decode queries
                    read = L if self.args.attention == "dense" else tokens_read_per_step(L, p)
                    self._counters.kv_tokens_read_total += read
                    self._counters.kv_tokens_dense_total += L
        if computed:
            self._counters.count_iteration(computed)
        return touched

    def _emit(self, samples: dict, touched: dict) -> list[RequestOutput]:
        """Sampled tokens into their sequences (stop checks, text), then the requests' outputs."""
        now = time.time()
        for seq, sample in samples.items():
            seq.drop_drafts()  # a verifying row's accepted drafts: appended below as its tokens
            if seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            # A row that verified drafts gives its accepted drafts and one more token; a stop among
            # them ends the sequence there.
            for one in sample if isinstance(sample, list) else (sample,):
                self._append_token(req, seq, one, now)
                if seq.is_finished:
                    break
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            finished = req.finished
            if finished or req.params.output_kind != "final_only":
                outputs.append(self._make_output(req, finished))
            if finished:
                self._retire(req)
        return outputs

    def _add_prompt_logprobs(self, req: Request, entries: list[tuple[int, TokenLogprob]]) -> None:
        """Append prompt logprobs in position order; a recompute after preemption repeats positions
        already held, which are skipped."""
        have = req.prompt_logprobs
        for pos, lp in entries:
            if pos == len(have):
                lp.token = self._token_text(lp.token_id)
                lp.top = [(i, self._token_text(i), v) for i, _, v in lp.top]
                have.append(lp)

    def _append_token(self, req: Request, seq: Sequence, sample: SampleResult, now: float) -> None:
        comp = req.completions[seq.index]
        token, params = sample.token_id, seq.params
        if sample.dead_end:  # allowed_token_ids and the grammar left nothing to sample: it cannot go on
            log.warning("request %s: allowed_token_ids leave no token the structured output allows after "
                        "%d tokens; finished with finish_reason 'error'", seq.request_id, seq.num_output_tokens)
            self._finish(seq, "error")
            if comp.detok is not None:  # release characters held for completion
                comp.text += comp.detok.flush()
            return
        seq.token_ids.append(token)
        self._counters.generation_tokens_total += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if params.output_kind == "final_only":
            if comp.last_token_time is not None:
                comp.itl.append(now - comp.last_token_time)
            comp.last_token_time = now
        if sample.logprob is not None:
            lp = sample.logprob
            lp.token = self._token_text(token)
            lp.top = [(i, self._token_text(i), v) for i, _, v in lp.top]
            seq.logprobs.append(lp)
        n_out = seq.num_output_tokens
        grammar_done = False
        if seq.matcher is not None:
            # The sampler only offered tokens the grammar allows, so a refusal is a bug, not bad input.
            if not seq.matcher.consume_token(token) or seq.matcher.is_error():
                log.error("request %s: structured output matcher refused token %d: %s", seq.request_id, token,
                          seq.matcher.get_error())
                self._finish(seq, "error")
                return
            grammar_done = seq.matcher.is_stopped()
        is_stop_token = (n_out >= params.min_tokens or seq.matcher is not None) and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids))
        if is_stop_token:  # ends the completion; its text (an end marker) is not shown
            self._finish(seq, "stop", token)
        else:
            if comp.detok is not None:
                delta = comp.detok.add(token)
                comp.text += delta
                if n_out >= params.min_tokens and self._check_stop_string(comp, len(delta)):
                    return  # cut at the stop string: nothing held back is shown
            if grammar_done:  # the output is complete: nothing else may follow
                self._finish(seq, "stop")
            elif (params.max_tokens is not None and n_out >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
        if seq.is_finished and comp.detok is not None:  # release characters held for completion
            delta = comp.detok.flush()
            comp.text += delta
            if delta and seq.finish_reason == "length" and n_out >= params.min_tokens:
                self._check_stop_string(comp, len(delta), already_finished=True)

    def _check_stop_string(self, comp: _Completion, new_chars: int, already_finished: bool = False) -> bool:
        hit = comp.matcher.find(comp.text, new_chars)
        if hit is None:
            return False
        cut, s = hit
        comp.text = comp.text[:cut]
        if already_finished:
            comp.seq.finish_reason, comp.seq.stop_reason = "stop", s
        else:
            self._finish(comp.seq, "stop", s)
        return True

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer is not None else ""

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _abort(self, request_id: str) -> RequestOutput | None:
        with self._lock:
            self._unstarted.discard(request_id)
            pending = [r for r in self._pending_add if r.request_id == request_id]
            self._pending_add = [r for r in self._pending_add if r.request_id != request_id]
        req = self.requests.get(request_id) or (pending[0] if pending else None)
        if req is None:
            return None
        for comp in req.completions:
            if not comp.seq.is_finished:
                self._finish(comp.seq, "abort")
        out = self._make_output(req)
        self._retire(req)
        return out

    def _retire(self, req: Request) -> None:
        req.metrics.finished_time = time.time()
        self.requests.pop(req.request_id, None)

    def _make_output(self, req: Request, finished: bool | None = None) -> RequestOutput:
        if finished is None:
            finished = req.finished
        # Cumulative fields cost O(length): every output of kind "cumulative", else the last only.
        full = finished or req.params.output_kind == "cumulative"
        outs = []
        for comp in req.completions:
            seq = comp.seq
            done = seq.is_finished
            visible = comp.matcher.visible(comp.text, done)
            start = seq.num_prompt_tokens
            num = len(seq.token_ids) - start  # known tokens (not those pending on the device)
            delta_lp = None
            if seq.logprobs is not None:
                delta_lp = seq.logprobs[comp.sent_logprobs:]
                comp.sent_logprobs = len(seq.logprobs)
            outs.append(CompletionOutput(
                index=seq.index, num_tokens=num,
                text=comp.text[:visible] if full else "",
                token_ids=seq.token_ids[start:] if full else [],
                delta_text=comp.text[comp.sent_chars:visible],
                delta_token_ids=seq.token_ids[start + comp.sent_tokens:],
                delta_logprobs=delta_lp,
                logprobs=list(seq.logprobs) if full and seq.logprobs is not None else None,
                finish_reason=seq.finish_reason if done else None,
                stop_reason=seq.stop_reason if done else None,
                inter_token_latencies=list(comp.itl) if comp.itl is not None and finished else None))
            comp.sent_chars = max(comp.sent_chars, visible)
            comp.sent_tokens = num
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.time()
        prompt_lps = None
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt_token_ids) and (
                full or not req.prompt_logprobs_sent):
            prompt_lps = list(req.prompt_logprobs)
            req.prompt_logprobs_sent = True
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished, req.metrics.snapshot(),
                             prompt_logprobs=prompt_lps)

    # -- stats ------------------------------------------------------------------------------------
    def _publish_stats(self) -> None:
        c, bm = self._counters, self.block_manager
        snap = copy.copy(c)
        snap.num_running = len(self.scheduler.running)
        snap.num_waiting = len(self.scheduler.waiting)
        snap.num_pages_total = bm.num_pages
        snap.num_pages_used = bm.num_used_pages
        snap.prefix_cache_queries_total = bm.prefix_queries
        snap.prefix_cache_hits_total = bm.prefix_hits
        snap.summaries_stored = bm.summaries_stored
        with self._lock:
            snap.num_waiting += len(self._pending_add)
            self._stats = snap

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (benchmarks' cold runs, vLLM's /reset_prefix_cache). Call it
        from the thread that runs step(), between steps: the page tables are not locked."""
        return self.block_manager.reset_prefix_cache()

    def cache_info(self) -> dict[str, str]:
        """The KV cache's configuration, as labels of /metrics' nsa:cache_config_info (vLLM's
        cache_config_info names where it has them; a page is vLLM's block)."""
        bm = self.block_manager
        return {"block_size": str(bm.page_size), "num_gpu_blocks": str(bm.num_pages),
                "enable_prefix_caching": str(bm.enable_prefix_caching),
                "cache_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "gpu_memory_utilization": str(self.args.gpu_memory_utilization),
                "attention": self.args.attention, "max_model_len": str(self.max_model_len)}

    def stats(self) -> EngineStats:
        with self._lock:
            return copy.copy(self._stats)

    # -- convenience (tests, offline use) ---------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_finished: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; returns the final output of each, in order. If one is refused
        (InvalidRequestError, ...), those added before it are aborted, so none runs unasked.
        `on_finished` sees each final output as its request ends (a progress bar's hook)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, plist):
                self.add_request(rid, prompt, p)
                added.append(rid)
        except Exception:
            for rid in added:
                self.abort_request(rid)
            while self.has_unfinished_requests():
                self.step()
            raise
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
                    if on_finished is not None:
                        on_finished(out)
        return [final[r] for r in ids]


def _by_sequence(seqs: list[Sequence], samples: list[SampleResult]) -> dict:
    """{seq: its SampleResult}, or for a row that verified drafts (listed once per position) the
    list of its results in position order."""
    out: dict = {}
    for seq, r in zip(seqs, samples):
        if seq.num_draft:
            out.setdefault(seq, []).append(r)
        else:
            out[seq] = r
    return out
