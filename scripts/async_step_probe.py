"""How much of a decode step the GPU is busy, with and without async scheduling (CUDA only).

The engine (random preset model, CUDA graphs) decodes `--batch` sequences past their prefill. Each
fixed-shape step's device work is bracketed by CUDA events (before its input copies, after its
sampling and read-back copies are queued), so the device time of a step is the events' distance, and the GPU's idle
time is the step's wall time minus it. The host time of the launch call itself is also printed:
in async mode it must not wait for the previous step (a launch that waits shows as launch ms ≈
device ms).

    python3 scripts/async_step_probe.py --preset paper-1b --batch 8 --input-len 65536
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from types import SimpleNamespace

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.bench import build_model
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams


def run(model, name, a, overlap: bool) -> dict:
    engine = LLMEngine(EngineArgs(device="cuda", max_num_seqs=max(8, a.batch), enable_prefix_caching=False,
                                  async_scheduling=overlap), model=model, tokenizer=None, model_name=name)
    engine.warmup()
    launches = []  # (host ms from the input copies to the queued sampling, start event, end event)
    static, sampler = engine.runner.static_decode, engine.sampler
    execute, launch = static.execute, sampler.launch
    open_step = []

    def timed_execute(*args, **kw):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        open_step.append((time.perf_counter(), start))
        return execute(*args, **kw)

    def timed_launch(*args, **kw):
        out = launch(*args, **kw)
        if open_step:  # a fixed-shape step (eager steps sample through here too)
            t0, start = open_step.pop()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            launches.append((1e3 * (time.perf_counter() - t0), start, end))
        return out

    static.execute, sampler.launch = timed_execute, timed_launch
    V = model.cfg.vocab_size
    params = SamplingParams(temperature=0, max_tokens=a.steps + 8, ignore_eos=True, output_kind="delta")
    gen = torch.Generator().manual_seed(0)
    for i in range(a.batch):
        engine.add_request(f"p{i}", torch.randint(8, V, (a.input_len + i,), generator=gen).tolist(), params)
    while engine.has_unfinished_requests():  # prefill: until every row decodes
        engine.step()
        t = engine.last_timing
        if t.num_tokens and t.num_tokens == t.num_decode == a.batch:
            break
    launches.clear()
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests() and steps < a.steps:
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0)
    while engine.has_unfinished_requests():
        engine.step()
    device = [s.elapsed_time(e) for _, s, e in launches]
    engine = static = sampler = execute = launch = timed_execute = timed_launch = None
    gc.collect()  # the engine holds reference cycles: its page pool is freed only by the collector
    torch.cuda.empty_cache()
    return dict(mode="async" if overlap else "sync", steps=steps, step_ms=wall / steps,
                device_ms=statistics.median(device), launch_ms=statistics.median(l for l, _, _ in launches),
                busy=sum(device) / wall)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper-1b")
    ap.add_argument("--model", default=None, help="a model directory instead of a preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="sync and async runs, alternated")
    a = ap.parse_args()
    margs = SimpleNamespace(model=a.model, preset=a.preset, set=None, input_len=a.input_len + a.batch,
                            output_len=a.steps + 16, seed=0)
    model, _, name = build_model(margs, torch.device("cuda"), torch.bfloat16)
    print(f"{name}: {a.batch} sequences × {a.input_len} prompt tokens, {a.steps} decode steps timed")
    print("| mode | step ms | device ms a step (median) | launch call ms (median) | GPU busy |")
    print("|---|---|---|---|---|")
    for overlap in (False, True) * a.rounds:
        r = run(model, name, a, overlap)
        print(f"| {r['mode']} | {r['step_ms']:.3f} | {r['device_ms']:.3f} | {r['launch_ms']:.3f} | "
              f"{100 * r['busy']:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
