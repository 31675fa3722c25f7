"""Wall time of a decode step whose batch holds one row that fails every time it runs: the engine's
bisecting retry against retrying every row alone, the policy it replaced. Runs on the CPU (no GPU
needed) or, with --device cuda, on a GPU (the failed decode step and its retries run eagerly).

Runs the bundled default model through `LLMEngine` with B running requests, times three normal
decode steps, then makes one row fail (an exception from the model runner whenever that row is in
the batch; on the fixed-shape path too, where decode steps run on a GPU) and times the step that
fails, retries and finds it. The old policy is reproduced by making the engine's halving split a
failed batch into single rows.

    python scripts/failed_step_bench.py --batch 16 --batch 64 [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import nsa_serve.engine.llm_engine as engine_module
from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams

BISECT = engine_module._halves


def one_by_one(rows: list) -> list[list]:
    return [[r] for r in rows]


def measure(batch: int, split, device: str) -> tuple[float, float]:
    """(median ms of three normal decode steps, ms of the step that fails and is retried)."""
    engine_module._halves = split
    try:
        eng = LLMEngine(EngineArgs(device=device, max_num_seqs=batch))
        prompt = eng.tokenizer.encode("Explain the Debian package manager in detail. ")
        for i in range(batch):
            eng.add_request(str(i), prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0))
        while len(eng.scheduler.running) < batch or any(s.in_prefill for s in eng.scheduler.running):
            eng.step()
        eng.step()  # warm-up
        normal = []
        for _ in range(3):
            t0 = time.perf_counter()
            eng.step()
            normal.append(time.perf_counter() - t0)
        culprit = next(s for s in eng.scheduler.running if s.request_id == str(batch // 2))
        execute = eng.runner.execute

        def faulty(inp):
            if culprit in inp.seqs:
                raise RuntimeError("injected fault")
            return execute(inp)

        eng.runner.execute = faulty
        static = eng.runner.static_decode
        if static is not None:  # on a GPU decode steps run on the fixed-shape path: fail there too
            prepare = static.prepare

            def faulty_prepare(seqs, num_new=None):
                if culprit in seqs:
                    raise RuntimeError("injected fault")
                return prepare(seqs, num_new)

            static.prepare = faulty_prepare
        for _ in range(3):  # (async scheduling on a GPU may meet the fault a step later)
            t0 = time.perf_counter()
            eng.step()
            failing = time.perf_counter() - t0
            if culprit.is_finished:
                return statistics.median(normal) * 1e3, failing * 1e3
        raise RuntimeError("the failing row did not end with an error")
    finally:
        engine_module._halves = BISECT


def release(device: str) -> None:
    """After `measure` returns (its frame and closures hold the engine): an engine holds reference
    cycles, so its page pool (most of the GPU's memory) goes back only through the collector, and
    the next engine sizes its pool from what is free."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="running requests (repeatable; default 16 and 64)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}")
    print("| rows | normal step ms | failing step, every row alone ms | failing step, bisected ms |")
    print("|---|---|---|---|")
    for b in args.batch or [16, 64]:
        n1, alone = measure(b, one_by_one, args.device)
        release(args.device)
        n2, bisected = measure(b, BISECT, args.device)
        release(args.device)
        print(f"| {b} | {statistics.median([n1, n2]):.1f} | {alone:.1f} | {bisected:.1f} |", flush=True)


if __name__ == "__main__":
    main()
