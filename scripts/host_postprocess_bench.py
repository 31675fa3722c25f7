"""Host cost of the engine's bookkeeping after each decode step, per sequence row (CPU, no GPU needed).

Runs the bundled default model on the CPU through `LLMEngine` with B requests of `--output-len`
tokens (ignore_eos), for each output kind given, and prints the median and mean of
`StepTiming.postprocess_s` (detokenizer, stop checks, building RequestOutputs) per row over the
decode-only steps, plus the scheduler's and the step-input builder's share for reference. The model
forward is not part of these numbers. Kinds are measured in the same run, one after another.

    python scripts/host_postprocess_bench.py --batch 64 --output-len 300 --kinds cumulative,delta,final_only
"""

from __future__ import annotations

import argparse
import statistics

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams


def run(eng: LLMEngine, batch: int, output_len: int, kind: str | None) -> dict:
    extra = {} if kind is None else {"output_kind": kind}
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.8, seed=1, **extra)
    prompt = eng.tokenizer.encode("Explain the Debian package manager in detail. " * 5)
    for i in range(batch):
        eng.add_request(f"{kind}-{i}", prompt, params)
    post, sched, prep, outputs = [], [], [], 0
    while eng.has_unfinished_requests():
        outputs += len(eng.step())
        t = eng.last_timing
        if t.num_decode == batch and t.num_tokens == batch:
            post.append(t.postprocess_s)
            sched.append(t.schedule_s)
            prep.append(t.prepare_s)
    us = 1e6 / batch
    return dict(kind=kind or "(default)", steps=len(post), outputs=outputs,
                post_med=statistics.median(post) * us, post_mean=statistics.mean(post) * us,
                post_last=statistics.median(post[-20:]) * us,
                sched=statistics.median(sched) * us, prep=statistics.median(prep) * us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=300)
    ap.add_argument("--kinds", default="cumulative,delta,final_only",
                    help="comma-separated SamplingParams.output_kind values ('default': leave it unset)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = LLMEngine(EngineArgs(device="cpu", max_num_seqs=args.batch, cpu_threads=args.threads))
    kinds = [None if k == "default" else k for k in args.kinds.split(",")]
    run(eng, min(args.batch, 4), 8, kinds[0])  # warm-up
    print(f"batch {args.batch}, {args.output_len} output tokens each; postprocess µs per row per decode step")
    print("| output kind | decode steps | outputs | median | mean | median, last 20 steps | scheduler | step inputs |")
    print("|---|---|---|---|---|---|---|---|")
    for k in kinds:
        r = run(eng, args.batch, args.output_len, k)
        print(f"| {r['kind']} | {r['steps']} | {r['outputs']} | {r['post_med']:.1f} | {r['post_mean']:.1f} | "
              f"{r['post_last']:.1f} | {r['sched']:.1f} | {r['prep']:.1f} |")


if __name__ == "__main__":
    main()
