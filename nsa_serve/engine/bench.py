"""Offline throughput benchmark of the engine: N requests of given prompt / output lengths.

Runs the same workload through the engine once per attention mode (`nsa`, `dense`, or both) on one
model, after `--warmup-rounds` untimed rounds of it (default 1: kernels compiled, caches warm), and
prints tokens/s, TTFT, and where each decode step's time goes: host work (scheduler,
block manager, building the step's index tensors, detokenizer/stop checks) vs the model forward +
sampling (synchronised with the GPU by the sampler's transfer of the token ids). Ratios are taken
between the modes measured in the same run. The model is either a directory (`--model`) or a
random-initialised preset (`--preset paper-1b`: paper-like attention shape, ~1B parameters), which
needs no tokenizer (text is not decoded then).

`--speculative-config` (the server's flag) turns on n-gram drafts: the steps that verify them count
as decode steps, their tokens as the tokens they gave (accepted drafts included), and the draft
acceptance is reported. The prompts are random tokens, so drafts come only from what the model
repeats: this measures what speculation costs more than what it gains on real text
(`scripts/spec_decode_check.py` and `scripts/spec_long_context.py` time that).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .args import EngineArgs
from .llm_engine import LLMEngine, resolve_device_dtype
from .protocol import SamplingParams


@dataclass
class BenchResult:
    mode: str
    attention_impl: str
    num_requests: int
    input_len: int
    output_len: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    decode_steps: int
    decode_tok_s: float  # over decode-only steps
    decode_step_ms: float  # mean wall time of a decode-only step
    decode_host_ms: float  # scheduler + input building + postprocess, per decode-only step
    decode_model_ms: float  # forward + sampling, per decode-only step
    schedule_ms: float  # scheduler + block manager alone, per decode-only step
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_max_s: float
    kv_read_ratio: float  # dense K/V tokens / tokens this mode read, over decode rows
    num_pages: int
    preemptions: int
    decode_path: str  # "CUDA graphs" | "eager"
    decode_rows_mean: float = 0.0  # sequences per decode-only step (≤ num_requests)
    decode_rows_max: int = 0
    warmup_s: float = 0.0  # LLMEngine.warmup: graph capture, kernel precompile, --warmup-context
    prefill_chunk: int = 0  # the engine's prefill chunk cap (LLMEngine.chunk_cap)
    async_scheduling: bool = False  # the engine's resolved setting (EngineArgs.resolved)
    piecewise_max_tokens: int = 0  # prompt steps up to this many tokens replay piecewise graphs (0: none)
    num_speculative_tokens: int = 0  # --speculative-config's k (0: off)
    spec_draft_tokens: int = 0  # draft tokens verified in the timed round …
    spec_accepted_tokens: int = 0  # … and accepted


def build_model(args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, name) from --model or a random-initialised --preset."""
    if args.model:
        from ..model.checkpoint import load_model
        from ..tokenizer import Tokenizer

        d = Path(args.model)
        model = load_model(d, device=device, dtype=dtype)
        tok = Tokenizer(d / "tokenizer.model") if (d / "tokenizer.model").is_file() else None
        return model, tok, d.resolve().name
    from ..model.config import preset
    from ..model.nsa_model import NSAModel

    overrides = dict(_parse_set(item) for item in (args.set or []))
    need = args.input_len + args.output_len
    cfg = preset(args.preset, **overrides)
    if cfg.max_position_embeddings < need:
        cfg.max_position_embeddings = need
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = NSAModel(cfg)
    _init_random(model, args.seed)
    return model.to(dtype=dtype).eval(), None, f"{args.preset}-random"


@torch.no_grad()
def _init_random(model, seed: int) -> None:
    """The reference init (small normals scaled by fan-in), drawn on the model's device (fast on GPU)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif ".pos" in name or name.endswith(".bias"):
            p.zero_()
        else:
            std = 0.02 if name.startswith("embed") else p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0
            p.normal_(0.0, std, generator=gen)


def _parse_set(item: str):
    key, _, value = item.partition("=")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def run_mode(model, tokenizer, name, args, mode: str) -> BenchResult:
    eargs = EngineArgs(device=str(next(model.parameters()).device), attention=mode,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       long_prefill_token_threshold=args.long_prefill_token_threshold,
                       max_queue=max(args.num_requests, 1), num_pages=args.num_pages,
                       gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=args.cpu_kv_cache_gb,
                       enable_prefix_caching=False, enforce_eager=args.enforce_eager, seed=args.seed,
                       piecewise_max_tokens=args.piecewise_max_tokens,
                       async_scheduling=args.async_scheduling,
                       cpu_threads=args.cpu_threads, cpu_reserved_cores=args.cpu_reserved_cores,
                       warmup_context=args.warmup_context, precompile=args.precompile,
                       **(args.speculative_config or {}))
    engine = LLMEngine(eargs, model=model, tokenizer=tokenizer, model_name=name)
    if args.input_len + args.output_len > engine.max_model_len:  # the pool was too small for one request
        raise SystemExit(f"nsa-serve bench: the {mode} engine's page pool ({engine.block_manager.num_pages} pages) "
                         f"holds {engine.max_model_len} tokens a sequence, fewer than --input-len + --output-len "
                         f"= {args.input_len + args.output_len}; raise --gpu-memory-utilization or --num-pages, "
                         "or lower the lengths")
    w0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - w0
    V = model.cfg.vocab_size
    # "delta": one output per request per step, as the server's streaming requests (the load tester's).
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                            seed=args.seed if args.temperature > 0 else None, output_kind="delta")
    # Warm-up rounds: the same workload, untimed. Triton compiles a kernel variant the first time a
    # shape class appears (the prefill top-n per power of two of the context, eager decode steps
    # next to a prefill chunk, …); measured on the H200 at 64k, that put ~12 s of compilation into
    # the first round's TTFTs (mean 16.1 s vs 5.0 s once compiled). Fresh random prompts each round.
    for w in range(args.warmup_rounds):
        wrng = random.Random(args.seed + 1 + w)
        for i in range(args.num_requests):
            engine.add_request(f"warmup-{w}-{i}", [wrng.randrange(8, V) for _ in range(args.input_len)], params)
        while engine.has_unfinished_requests():
            engine.step()
    before = engine.stats()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(8, V) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    t0 = time.perf_counter()  # after the prompts exist: building 4 × 64k random prompts takes ~0.2 s
    t0_wall = time.time()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params, arrival_time=t0_wall)
    decode_steps, ttft, out_tokens, seen = [], [], 0, {}
    while engine.has_unfinished_requests():
        s0 = time.perf_counter()
        outs = engine.step()
        wall = time.perf_counter() - s0
        t = engine.last_timing
        # Tokens the step gave (a row verifying drafts gives 1 to 1 + k).
        emitted = 0
        for o in outs:
            emitted += o.outputs[0].num_tokens - seen.get(o.request_id, 0)
            seen[o.request_id] = o.outputs[0].num_tokens
        # Decode steps: every row a decode row, or one verifying drafts.
        if t.num_tokens and t.num_tokens == t.num_decode + t.verify_tokens:
            decode_steps.append((wall, t, emitted))
        for o in outs:
            if o.finished:
                ttft.append(o.metrics.first_token_time - o.metrics.arrival_time)
                out_tokens += o.outputs[0].num_tokens
    total = time.perf_counter() - t0
    stats = engine.stats()
    n = max(len(decode_steps), 1)
    dec_wall = sum(w for w, _, _ in decode_steps)
    dec_tokens = sum(e for _, _, e in decode_steps)
    dec_rows = sum(t.num_decode + t.num_verify for _, t, _ in decode_steps)
    pw = engine.runner.piecewise
    result = BenchResult(
        mode=mode, attention_impl=engine.runner.attention.describe(), num_requests=args.num_requests,
        input_len=args.input_len, output_len=args.output_len, wall_s=total, output_tokens=out_tokens,
        output_tok_s=out_tokens / total, decode_steps=len(decode_steps),
        decode_tok_s=dec_tokens / dec_wall if dec_wall else 0.0, decode_step_ms=1e3 * dec_wall / n,
        decode_host_ms=1e3 * sum(t.schedule_s + t.prepare_s + t.postprocess_s for _, t, _ in decode_steps) / n,
        decode_model_ms=1e3 * sum(t.model_s for _, t, _ in decode_steps) / n,
        schedule_ms=1e3 * sum(t.schedule_s for _, t, _ in decode_steps) / n,
        ttft_mean_s=statistics.fmean(ttft), ttft_p50_s=statistics.median(ttft), ttft_max_s=max(ttft),
        kv_read_ratio=(stats.kv_tokens_dense_total - before.kv_tokens_dense_total)
        / max(stats.kv_tokens_read_total - before.kv_tokens_read_total, 1),
        num_pages=engine.block_manager.num_pages,
        preemptions=stats.num_preemptions_total - before.num_preemptions_total,
        decode_path="CUDA graphs" if engine.runner.static_decode is not None and engine.runner.static_decode.graphs
        else "eager",
        decode_rows_mean=dec_rows / n if decode_steps else 0.0,
        decode_rows_max=max((t.num_decode + t.num_verify for _, t, _ in decode_steps), default=0), warmup_s=warmup_s,
        prefill_chunk=engine.chunk_cap, async_scheduling=bool(engine.args.async_scheduling),
        piecewise_max_tokens=pw.max_tokens if pw is not None and pw.graphs else 0,
        num_speculative_tokens=engine.args.num_speculative_tokens,
        spec_draft_tokens=stats.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total,
        spec_accepted_tokens=stats.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total)
    return result


def release_device_memory() -> None:
    """Give a finished mode's memory back before the next mode's engine sizes its page pool. Called
    after `run_mode` has returned, when none of its locals (the engine, its runner's graphs) is left
    to hold the cache: called inside it, a local still referring to the runner kept the first
    engine's ~65 GB of pages out of the driver's free memory on an 80 GB H100 (2026-12-05), and the
    dense engine's pool came out at 532 pages."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(results: list[BenchResult]) -> str:
    cols = [("mode", "mode", "{}"), ("out tok/s", "output_tok_s", "{:.1f}"), ("decode tok/s", "decode_tok_s", "{:.1f}"),
            ("decode step ms", "decode_step_ms", "{:.2f}"), ("model ms", "decode_model_ms", "{:.2f}"),
            ("host ms", "decode_host_ms", "{:.2f}"), ("sched ms", "schedule_ms", "{:.3f}"),
            ("TTFT mean s", "ttft_mean_s", "{:.3f}"), ("TTFT max s", "ttft_max_s", "{:.3f}"),
            ("decode rows", "decode_rows_mean", "{:.1f}"), ("KV read ×", "kv_read_ratio", "{:.2f}"),
            ("preempt", "preemptions", "{}")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(getattr(r, key)) for _, key, fmt in cols) + " |")
    by = {r.mode: r for r in results}
    if "nsa" in by and "dense" in by and by["dense"].decode_tok_s:
        lines.append("")
        lines.append(f"NSA / dense decode tokens/s: {by['nsa'].decode_tok_s / by['dense'].decode_tok_s:.2f}x; "
                     f"decode step time dense / NSA: {by['dense'].decode_step_ms / by['nsa'].decode_step_ms:.2f}x")
    for r in results:
        sched = "async" if r.async_scheduling else "synchronous"
        prompt = (f"prompt steps ≤ {r.piecewise_max_tokens} tokens piecewise CUDA graphs"
                  if r.piecewise_max_tokens else "prompt steps eager")
        lines.append(f"{r.mode}: {r.attention_impl}, decode {r.decode_path}, {sched} scheduling, {prompt}; "
                     f"prefill chunks of {r.prefill_chunk} "
                     f"tokens; {r.num_pages} pages; host share of a decode step "
                     f"{100 * r.decode_host_ms / max(r.decode_step_ms, 1e-9):.1f}%; start-up warm-up {r.warmup_s:.1f} s"
                     + (f"; speculative decoding, {r.num_speculative_tokens} drafts at most: {r.spec_accepted_tokens} "
                        f"of {r.spec_draft_tokens} draft tokens accepted "
                        f"({100 * r.spec_accepted_tokens / max(r.spec_draft_tokens, 1):.0f} %)"
                        if r.num_speculative_tokens else ""))
    for r in results:
        if r.decode_steps and r.decode_rows_max < r.num_requests:
            # Requests that finish their outputs beside other prompts' prefill chunks never reach a
            # decode-only step: the decode columns then measure a smaller batch than asked for.
            lines.append(f"note ({r.mode}): decode-only steps ran at most {r.decode_rows_max} of {r.num_requests} "
                         f"sequences (mean {r.decode_rows_mean:.1f}); raise --output-len above the prefill's "
                         "step count to measure decode at the full batch")
    return "\n".join(lines)


def main(args) -> int:
    if not args.model and not args.preset:
        from ..model.init_model import ensure_default_model

        args.model = str(ensure_default_model())
    device, dtype = resolve_device_dtype(EngineArgs(device=args.device, dtype=args.dtype))
    model, tok, name = build_model(args, device, dtype)
    modes = ["nsa", "dense"] if args.attention == "both" else [args.attention]
    print(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {device}, {dtype}; "
          f"{args.num_requests} requests × {args.input_len} prompt + {args.output_len} output tokens")
    results = []
    for mode in modes:
        results.append(run_mode(model, tok, name, args, mode))
        release_device_memory()
        print(f"  {mode}: done in {results[-1].wall_s:.1f} s", flush=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
    return 0
