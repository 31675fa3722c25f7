"""Where a long prompt's time goes when it is prefilled in small chunks (GPU).

    python scripts/prefill_chunk_probe.py [--len 65536] [--chunks 512,1024,2048,4096,8192,65536]
    (on the GPU machine after `source scripts/device_env.sh`, which makes kernels/ importable as nsa_kernels)

Part 1 (kernels): one layer's `nsa_prefill` over the whole prompt as consecutive chunks (plans made
beforehand, as an engine step does), total ms and per-kernel ms summed over the chunks (torch
profiler), and the host time of one `plan_prefill` for the last chunk.
Part 2 (engine, --engine): the paper-1b preset served by the real engine, one prompt of --len
tokens with each chunk size as `long_prefill_token_threshold`: time to first token and the mean
wall / model / prepare time of its prefill steps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from nsa_kernels.bench_prefill import PAPER, make_inputs, nsa_call, profile_kernels, timed
from nsa_kernels.nsa_prefill import default_config, plan_prefill


def kernels(S: int, chunks: list[int]) -> None:
    cfg = default_config(torch.device("cuda"))
    q, gates, layer, bt = make_inputs(S)
    print("| chunk | calls | kernels ms (whole prompt, one layer) | per call ms | per kernel ms | plan ms (last chunk) |")
    print("|---|---|---|---|---|---|")
    for c in chunks:
        fn = nsa_call(q, gates, layer, bt, S, c, PAPER, cfg)
        t = timed(fn, 3)
        prof = profile_kernels(fn)
        parts = " ".join(f"{k.split('_kernel')[0].strip('_')} {v:.2f}" for k, v in sorted(prof.items(), key=lambda x: -x[1])
                         if v >= 0.05 * t / 10)
        host = []
        for _ in range(7):
            t0 = time.perf_counter()
            plan_prefill([0, c], [S], page_size=PAPER.select_block, group=16, device="cuda", config=cfg)
            torch.cuda.synchronize()
            host.append((time.perf_counter() - t0) * 1e3)
        n = -(-S // c)
        print(f"| {c} | {n} | {t:.2f} | {t / n:.3f} | {parts} | {statistics.median(host):.2f} |", flush=True)


def engine(S: int, chunks: list[int]) -> None:
    from types import SimpleNamespace

    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.bench import build_model
    from nsa_serve.engine.llm_engine import LLMEngine
    from nsa_serve.engine.protocol import SamplingParams

    a = SimpleNamespace(model=None, preset="paper-1b", set=None, input_len=S, output_len=4, seed=0)
    model, tok, name = build_model(a, torch.device("cuda"), torch.bfloat16)
    print("| chunk | budget | TTFT s | prefill steps | step wall ms | model ms | prepare ms |")
    print("|---|---|---|---|---|---|---|")
    for c in chunks:
        budget = max(c, 2048)
        eng = LLMEngine(EngineArgs(device="cuda", max_num_batched_tokens=budget, long_prefill_token_threshold=c,
                                   enable_prefix_caching=False), model=model, tokenizer=tok, model_name=name)
        eng.warmup()
        for rnd in range(2):  # the first round compiles what this chunk size meets
            g = torch.Generator().manual_seed(rnd)
            prompt = torch.randint(8, model.cfg.vocab_size, (S,), generator=g).tolist()
            eng.add_request(f"r{rnd}", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            t0 = time.perf_counter()
            walls, models, preps = [], [], []
            while eng.has_unfinished_requests():
                s0 = time.perf_counter()
                eng.step()
                walls.append(time.perf_counter() - s0)
                models.append(eng.last_timing.model_s)
                preps.append(eng.last_timing.prepare_s)
            ttft = time.perf_counter() - t0
        m = lambda xs: 1e3 * statistics.mean(xs[1:]) if len(xs) > 1 else 1e3 * xs[0]  # noqa: E731
        print(f"| {c} | {budget} | {ttft:.3f} | {len(walls)} | {m(walls):.2f} | {m(models):.2f} | {m(preps):.2f} |",
              flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()


def trace(S: int, chunk: int) -> None:
    """torch-profiler table of one prefill step near the end of the prompt (CPU and CUDA time)."""
    from types import SimpleNamespace

    from torch.profiler import ProfilerActivity, profile

    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.bench import build_model
    from nsa_serve.engine.llm_engine import LLMEngine
    from nsa_serve.engine.protocol import SamplingParams

    a = SimpleNamespace(model=None, preset="paper-1b", set=None, input_len=S, output_len=4, seed=0)
    model, tok, name = build_model(a, torch.device("cuda"), torch.bfloat16)
    eng = LLMEngine(EngineArgs(device="cuda", max_num_batched_tokens=max(chunk, 2048), long_prefill_token_threshold=chunk,
                               enable_prefix_caching=False), model=model, tokenizer=tok, model_name=name)
    eng.warmup()
    for rnd in range(2):
        g = torch.Generator().manual_seed(rnd)
        prompt = torch.randint(8, model.cfg.vocab_size, (S,), generator=g).tolist()
        eng.add_request(f"t{rnd}", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        k = 0
        while eng.has_unfinished_requests():
            k += 1
            if rnd == 1 and k == S // chunk - 2:
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t0 = time.perf_counter()
                    eng.step()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                print(f"step {k}: host returned after {1e3 * (t1 - t0):.2f} ms, GPU done {1e3 * (t2 - t0):.2f} ms")
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
            else:
                eng.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=65536)
    ap.add_argument("--chunks", default="512,1024,2048,4096,8192,65536")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--trace", type=int, default=0, help="profile one engine step of this chunk size")
    args = ap.parse_args()
    chunks = [int(x) for x in args.chunks.split(",")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if not args.no_kernels:
        kernels(args.len, chunks)
    if args.engine:
        engine(args.len, [c for c in chunks if c < args.len] or chunks)
    if args.trace:
        trace(args.len, args.trace)


if __name__ == "__main__":
    main()
