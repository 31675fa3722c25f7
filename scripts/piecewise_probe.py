"""Prompt and mixed steps with and without piecewise CUDA graphs (CUDA only).

Two parts, one engine at a time (each takes the GPU's page pool):

* `--check`: an engine with the graphs serves greedy requests of mixed lengths with late
  arrivals; every step the graphs serve is also run eagerly first, on inputs prepared without
  them (the second run rewrites the same K/V and summaries), and the two logits are compared.
  Then the whole run's tokens are compared with an engine without the graphs (required for the
  bundled trained model), and every page must be back in the pool.
* timing: `--decode-rows` sequences decode at `--context` tokens; then prompts of each
  `--prompt-len` arrive one at a time (each ends at its first token), so every timed step is one
  prompt chunk beside the decode rows. Wall ms of that engine step, medians over `--reps` after
  one warm-up; the same for a lone prompt (no decode rows). The eager baseline is the same engine
  with the path detached, step by step in turn with it.

    python3 scripts/piecewise_probe.py --check
    python3 scripts/piecewise_probe.py --preset paper-1b --decode-rows 32 --context 1024 --reps 9
    python3 scripts/piecewise_probe.py --preset paper-1b --profile --prompt-len 128

* `--profile`: where a piecewise step's wall time goes, for each `--prompt-len` alone and beside
  the decode rows: host time inside the decode and prefill attention calls (and the prefill
  plan), inside the graph replays, the GPU's kernel time in the step (torch profiler), then the
  functions with the most host time in one such step (cProfile).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import statistics
import time
from types import SimpleNamespace

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.bench import build_model
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams


def make_engine(model, name, tokenizer, max_tokens: int, rows: int) -> LLMEngine:
    engine = LLMEngine(EngineArgs(device="cuda", max_num_seqs=max(8, rows + 2), enable_prefix_caching=False,
                                  piecewise_max_tokens=max_tokens, precompile=False),
                       model=model, tokenizer=tokenizer, model_name=name)
    t0 = time.perf_counter()
    engine.warmup()
    pw = engine.runner.piecewise
    print(f"  engine (piecewise_max_tokens={max_tokens}): warm-up {time.perf_counter() - t0:.1f} s, graphs for "
          f"{pw.sizes if pw else 'none'}; decode-row graphs for {pw.decode_rows.sizes if pw else 'none'} "
          f"(their capture reserved {pw.decode_rows.capture_bytes / 2**20 if pw else 0:.0f} MB); "
          f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved in all", flush=True)
    return engine


def release() -> None:
    """After an engine's last reference is gone: it holds reference cycles, so its page pool is
    freed only by the collector (and the next engine sizes its pool from what is free)."""
    gc.collect()
    torch.cuda.empty_cache()


def served_workload(model, name, tokenizer, V: int, max_tokens: int, double_check: bool):
    engine = make_engine(model, name, tokenizer, max_tokens, 8)
    pw = engine.runner.piecewise
    served0 = pw.steps if pw else 0
    outs, diffs = workload(engine, V, double_check)
    return outs, diffs, (pw.steps - served0 if pw else 0)


@contextlib.contextmanager
def double_run(engine):
    """Inside, every step the engine serves through the piecewise path runs three times on the
    same cache (each run rewrites the same K/V and summaries): eagerly, on inputs prepared without
    the path; through the pieces run as plain code (no graphs); then as the engine would (the
    graphs where captured). Yields a list that collects, per such step, two numbers over the last
    layer's hidden states of all its rows: max |Δh| / max |h| of the pieces against the eager
    path (the padded shapes' and φ's stacked weights' rounding), and of the served run against
    the pieces (what the capture changes: nothing). The uncaptured run runs the decode rows' and
    the chunks' attention (piecewise_decode, piecewise_prefill) uncaptured too.

    Independent K/V: φ reads its old rows from its ring before the step writes it, and a chunk
    longer than the ring overwrites them (`ModelRunner.overwrites_phi_source`), so φ's ring pages
    of the step's sequences are kept before the first run and put back before each later one
    (without that the later runs computed summaries from the chunk's own rows: 0.2–0.66 of max
    |h| against the eager run, and the served run's cache was left wrong)."""
    runner = engine.runner
    pw, prepare, execute = runner.piecewise, runner.prepare, runner.execute
    layers, forward = runner._layers, pw.forward
    diffs, queue, hidden = [], [], {}

    def both_prepare(seqs, nums):
        runner.piecewise = None
        eager_inp = prepare(seqs, nums)
        runner.piecewise = pw
        inp = prepare(seqs, nums)
        queue.append(eager_inp if inp.piecewise is not None else None)
        return inp

    def rel(a, b):
        a, b = a.float(), b.float()
        return ((a - b).abs().max() / b.abs().max()).item()

    def keep_phi_rings(seqs):
        if runner.shared:  # φ reads old rows from the pages, which no run overwrites
            return lambda: None
        pages = torch.tensor(sorted({p for s in seqs for p in s.cmp_ring}), dtype=torch.long, device=runner.device)
        kept = [(c.k_cache[pages].clone(), c.v_cache[pages].clone()) for c in runner.caches]

        def put_back():
            for c, (k, v) in zip(runner.caches, kept):
                c.k_cache[pages], c.v_cache[pages] = k, v
        return put_back

    def both_execute(inp):
        eager_inp = queue.pop()
        if eager_inp is None:
            return execute(inp)
        put_back = keep_phi_rings(inp.seqs)
        execute(eager_inp)
        put_back()
        graphs, pw.graphs = pw.graphs, {}
        rows, pw.decode_rows.graphs = pw.decode_rows.graphs, {}
        chunks = pw.prefill_rows.graphs if pw.prefill_rows is not None else None
        if chunks is not None:
            pw.prefill_rows.graphs = {}
        try:
            execute(inp)
        finally:
            pw.graphs, pw.decode_rows.graphs = graphs, rows
            if chunks is not None:
                pw.prefill_rows.graphs = chunks
        pieces = hidden.pop("piecewise").clone()
        put_back()
        out = execute(inp)
        diffs.append((rel(pieces, hidden.pop("eager")), rel(hidden.pop("piecewise"), pieces)))
        return out

    def keep(name, fn):
        def run(inp):
            hidden[name] = h = fn(inp)
            return h
        return run

    runner.prepare, runner.execute = both_prepare, both_execute
    runner._layers, pw.forward = keep("eager", layers), keep("piecewise", forward)
    try:
        yield diffs
    finally:
        del runner.prepare, runner.execute, runner._layers, pw.forward  # the class's methods again


def workload(engine, V: int, double_check: bool) -> tuple[dict, list]:
    with double_run(engine) if double_check else contextlib.nullcontext([]) as diffs:
        outs = _serve(engine, V)
    engine.block_manager.check_all_free()
    return outs, diffs


def _serve(engine, V: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    lens = [5, 37, 300, 1000, 2500, 64, 700]
    for i, n in enumerate(lens[:4]):
        engine.add_request(f"r{i}", torch.randint(8, V, (n,), generator=gen).tolist(), params)
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
        steps += 1
        if steps in (2, 5, 9):  # late arrivals: mixed steps of decode rows and a prompt
            i = 4 + (2, 5, 9).index(steps)
            engine.add_request(f"r{i}", torch.randint(8, V, (lens[i],), generator=gen).tolist(), params)
    return outs


def check(model, name, tokenizer, V: int, same_tokens: bool) -> bool:
    """`same_tokens`: also require the eager engine's tokens (a trained model; a random one's
    near-ties may flip on bf16 rounding of differently shaped GEMMs)."""
    outs, diffs, served = served_workload(model, name, tokenizer, V, 2048, True)
    release()
    ref, _, _ = served_workload(model, name, tokenizer, V, 0, False)
    release()
    same = sum(outs[k].token_ids == ref[k].token_ids for k in ref)
    lp = max(abs(a.logprob - b.logprob) for k in ref for a, b in zip(outs[k].logprobs, ref[k].logprobs))
    path, graph = max(d[0] for d in diffs), max(d[1] for d in diffs)
    ok = served > 0 and 2 * len(diffs) == served and graph < 1e-3 and (same == len(ref) or not same_tokens)
    print(f"  {name}: steps through the path {len(diffs)}; each also run eagerly and as uncaptured pieces: max "
          f"|Δh| / max|h| pieces vs eager {path:.2e}, graphs vs pieces {graph:.2e}; requests with the same tokens as the eager engine "
          f"{same}/{len(ref)} (sampled-token logprobs within {lp:.2e}); every page back; {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def decode_budget(a) -> int:
    """Tokens a decode row may produce: two steps per timed or warm-up arrival, and slack."""
    return 4 * len(a.prompt_len) * (a.reps + 1) + 64


MODES = ("eager", "pieces, attention eager", "pieces + decode-row graphs", "pieces + decode and prefill graphs")


def timing(model, name, a) -> None:
    """One engine with the graphs; each timed arrival is served once in each of MODES, in turn,
    so all see the same engine state and host conditions: without the path (the runner's
    `piecewise` detached for that step), through the pieces with all attention in the eager call
    (as before piecewise_decode), with the decode rows' attention from its graphs (the chunks'
    eager, as before piecewise_prefill), and as the engine serves it."""
    V = model.cfg.vocab_size
    engine = make_engine(model, name, None, a.piecewise_max_tokens, a.decode_rows)
    runner = engine.runner
    pw = runner.piecewise
    rows, chunks = pw.decode_rows, pw.prefill_rows
    gen = torch.Generator().manual_seed(0)
    long = SamplingParams(temperature=0, max_tokens=decode_budget(a), ignore_eos=True, output_kind="delta")
    print(f"\n{name}: one prompt chunk a step beside N decode rows at {a.context} tokens; wall ms of the "
          f"engine step, median of {a.reps} per mode (taken in turn, after one warm-up each); steps over "
          f"{a.piecewise_max_tokens} tokens stay eager")
    print("| decode rows | prompt tokens | " + " | ".join(f"{m} ms" for m in MODES) + " | speed-up over eager |")
    print("|---|---|---|---|---|---|---|")
    for decode_rows in (0, a.decode_rows):
        for i in range(decode_rows):
            engine.add_request(f"d{i}", torch.randint(8, V, (a.context + i,), generator=gen).tolist(), long)
        for _ in range(10000 if decode_rows else 0):  # until every row decodes
            engine.step()
            t = engine.last_timing
            if t.num_tokens and t.num_tokens == t.num_decode == decode_rows:
                break
        else:
            if decode_rows:
                raise RuntimeError("the decode rows never ran alone (page pool too small?)")
        for plen in a.prompt_len:
            walls = {m: [] for m in MODES}
            for r in range(a.reps + 1):
                for m in MODES:
                    # the attention graphs detached for the modes without them
                    runner.piecewise = None if m == MODES[0] else pw
                    pw.decode_rows = rows if m in MODES[2:] else None
                    pw.prefill_rows = chunks if m == MODES[3] else None
                    engine.add_request(f"p{plen}-{r}-{m}", torch.randint(8, V, (plen,), generator=gen).tolist(),
                                       SamplingParams(temperature=0, max_tokens=1))
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    engine.step()  # the prompt's chunk beside the decode rows; it ends at its token
                    torch.cuda.synchronize()
                    if r:
                        walls[m].append(1e3 * (time.perf_counter() - t0))
                    engine.step()  # a decode-only step between arrivals
            med = [statistics.median(walls[m]) for m in MODES]
            print(f"| {decode_rows} | {plen} | " + " | ".join(f"{x:.2f}" for x in med)
                  + f" | {med[0] / med[-1]:.2f}× |", flush=True)
    runner.piecewise = pw
    pw.decode_rows, pw.prefill_rows = rows, chunks


@contextlib.contextmanager
def host_timers(engine):
    """Inside, host seconds spent in the attention backend's decode, prefill and plan calls and in
    CUDA graph replays accumulate in the yielded dict (no synchronisation: launch cost only)."""
    att = engine.runner.attention
    spent = {"decode attention": 0.0, "prefill attention": 0.0, "prefill plan": 0.0, "graph replays": 0.0}
    saved = {n: getattr(att, n) for n in ("decode_fn", "prefill_fn", "prefill_plan_fn")}
    replay = torch.cuda.CUDAGraph.replay

    def timed(key, fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
        return run

    for n, key in (("decode_fn", "decode attention"), ("prefill_fn", "prefill attention"),
                   ("prefill_plan_fn", "prefill plan")):
        if saved[n] is not None:
            setattr(att, n, timed(key, saved[n]))
    torch.cuda.CUDAGraph.replay = timed("graph replays", replay)
    try:
        yield spent
    finally:
        torch.cuda.CUDAGraph.replay = replay
        for n, fn in saved.items():
            setattr(att, n, fn)


def profile(model, name, a) -> None:
    """Per `--prompt-len`, alone and beside `--decode-rows` rows: the breakdown of one arriving
    prompt's piecewise step (medians over `--reps`), then cProfile's top functions for one step."""
    V = model.cfg.vocab_size
    engine = make_engine(model, name, None, a.piecewise_max_tokens, a.decode_rows)
    gen = torch.Generator().manual_seed(0)
    long = SamplingParams(temperature=0, max_tokens=decode_budget(a), ignore_eos=True, output_kind="delta")
    print(f"\n{name}: where a prompt's piecewise step goes (context {a.context}); ms, medians of {a.reps}")
    print("| decode rows | prompt tokens | wall | decode attention (host) | prefill attention (host) | "
          "prefill plan (host) | graph replays (host) | GPU kernels |")
    print("|---|---|---|---|---|---|---|---|")
    listings = []
    for decode_rows in (0, a.decode_rows):
        for i in range(decode_rows):
            engine.add_request(f"d{i}", torch.randint(8, V, (a.context + i,), generator=gen).tolist(), long)
        for _ in range(10000 if decode_rows else 0):
            engine.step()
            t = engine.last_timing
            if t.num_tokens and t.num_tokens == t.num_decode == decode_rows:
                break
        for plen in a.prompt_len:
            rows = []

            def arrival(tag):
                engine.add_request(f"q{plen}-{decode_rows}-{tag}", torch.randint(8, V, (plen,), generator=gen).tolist(),
                                   SamplingParams(temperature=0, max_tokens=1))
                torch.cuda.synchronize()

            for r in range(a.reps + 1):
                arrival(r)
                with host_timers(engine) as spent:
                    t0 = time.perf_counter()
                    engine.step()
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - t0
                engine.step()
                arrival(f"k{r}")
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    engine.step()
                    torch.cuda.synchronize()
                gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3  # µs → ms
                engine.step()
                if r:
                    rows.append([1e3 * wall] + [1e3 * v for v in spent.values()] + [gpu])
            med = [statistics.median(c) for c in zip(*rows)]
            print(f"| {decode_rows} | {plen} | " + " | ".join(f"{m:.2f}" for m in med) + " |", flush=True)
            arrival("cprofile")
            pr = cProfile.Profile()
            pr.enable()
            engine.step()
            torch.cuda.synchronize()
            pr.disable()
            engine.step()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
            listings.append((decode_rows, plen, buf.getvalue()))
    for decode_rows, plen, text in listings:
        print(f"\ncProfile, one step: {plen}-token prompt beside {decode_rows} decode rows (by own time)")
        print(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true",
                    help="correctness: the bundled model, paper-1b, and paper-1b with independent K/V")
    ap.add_argument("--preset", default="paper-1b")
    ap.add_argument("--set", action="append", help="preset overrides, e.g. shared_kv=false")
    ap.add_argument("--model", default=None, help="a model directory instead of a preset")
    ap.add_argument("--decode-rows", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, action="append", help="default 16, 128, 512, 2000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--piecewise-max-tokens", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="where a piecewise step's time goes")
    a = ap.parse_args()
    a.prompt_len = a.prompt_len or [16, 128, 512, 2000]
    dev = torch.device("cuda")
    if a.check:
        ok = True
        from nsa_serve.model.init_model import ensure_default_model
        margs = SimpleNamespace(model=str(ensure_default_model()))
        model, tokenizer, name = build_model(margs, dev, torch.bfloat16)
        ok &= check(model, name, tokenizer, model.cfg.vocab_size, True)
        del model
        for overrides in (None, ["shared_kv=false"]):
            margs = SimpleNamespace(model=None, preset="paper-1b", set=overrides, input_len=4096, output_len=64,
                                    seed=0)
            model, _, name = build_model(margs, dev, torch.bfloat16)
            ok &= check(model, name if overrides is None else f"{name} (independent K/V)", None,
                        model.cfg.vocab_size, False)
            del model
            release()
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    margs = SimpleNamespace(model=a.model, preset=a.preset, set=a.set, input_len=a.context + a.decode_rows,
                            output_len=decode_budget(a), seed=0)
    model, _, name = build_model(margs, dev, torch.bfloat16)
    (profile if a.profile else timing)(model, name, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
