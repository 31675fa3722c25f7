"""Host time of the engine's decode steps, with the device's work stubbed out (runs on CPU).

The fixed-shape decode path (the CUDA-graph one) is attached on CPU, its forward returns fixed
logits and its sampling fixed tokens, so what is timed is the engine's own Python: scheduler,
block manager, step inputs, bookkeeping, detokenizer, stop checks and outputs. With async
scheduling that time hides behind the GPU's only while it is shorter than the GPU's step
(docs/engine.md); this measures it. The bundled model's tokenizer detokenizes.

    python scripts/host_step_bench.py --rows 64 --rows 256 [--steps 200] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.decode_graphs import StaticDecode
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.engine.sampler import PendingSample


def host_ms(rows: int, overlap: bool, steps: int, profile: bool) -> float:
    engine = LLMEngine(EngineArgs(device="cpu", async_scheduling=overlap, max_num_seqs=rows, num_pages=8000))
    static = engine.runner.static_decode = StaticDecode(engine.runner, rows, engine.max_model_len)
    V = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, V, generator=gen)
    tokens = torch.randint(8, V, (rows,), generator=gen)
    static.forward = lambda x: logits[: x["ids"].shape[0]]
    sample = engine.sampler.launch

    def launch(lg, seqs):  # the stubbed forward's logits: fixed tokens (argmax is device work)
        if lg.data_ptr() == logits.data_ptr():
            return PendingSample(tokens[: len(seqs)].clone(), None, [s.params for s in seqs], [], 0)
        return sample(lg, seqs)

    engine.sampler.launch = launch
    params = SamplingParams(temperature=0, max_tokens=steps + 100, ignore_eos=True, output_kind="delta")
    for i in range(rows):
        engine.add_request(f"r{i}", torch.randint(8, V, (100 + i,), generator=gen).tolist(), params)
    while True:  # prefill, until every row decodes
        engine.step()
        t = engine.last_timing
        if t.num_tokens and t.num_tokens == t.num_decode == rows:
            break
    prof = cProfile.Profile() if profile else None
    times = []
    if prof:
        prof.enable()
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(1e3 * (time.perf_counter() - t0))
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, action="append", help="sequences decoding (repeatable; default 64, 256)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="sync and async runs per row count")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps (slows them)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| rows | sync: host ms a step (median) | async: host ms a step (median) |")
    print("|---|---|---|")
    for rows in a.rows or [64, 256]:
        runs = {False: [], True: []}
        for _ in range(a.rounds):
            for overlap in (False, True):
                runs[overlap].append(host_ms(rows, overlap, a.steps, a.profile))
        fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
        print(f"| {rows} | {fmt(runs[False])} | {fmt(runs[True])} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
