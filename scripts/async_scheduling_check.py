"""GPU check of async scheduling: the same requests through the engine with and without
`async_scheduling` (CUDA graphs on) must end with the same outputs, and every page must come back.

    python scripts/async_scheduling_check.py [--model DIR]    # default: the bundled model

Requests: greedy, seeded top-p sampling with n = 2, logprobs, a stop token met mid-way, a stop
string, min_tokens, a repetition penalty (those rows run synchronously), late arrivals. Then a
decode-heavy run (64 requests) is timed both ways. Prints PASS or FAIL and exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.model.init_model import ensure_default_model


def drive(engine, requests, arrivals):
    final, step, todo = {}, 0, dict(requests)
    while todo or engine.has_unfinished_requests():
        for rid in [r for r in todo if arrivals.get(r, 0) <= step]:
            engine.add_request(rid, *todo.pop(rid))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    engine.block_manager.check_all_free()
    return final


def view(out):
    return [(c.index, c.token_ids, c.finish_reason, c.text,
             [(lp.token_id, round(lp.logprob, 3)) for lp in (c.logprobs or [])]) for c in out.outputs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = args.model or str(ensure_default_model())
    engines = {}
    for flag in (False, True):
        engines[flag] = LLMEngine(EngineArgs(model=model, device="cuda", async_scheduling=flag, max_num_seqs=64,
                                                  num_pages=4096))  # two engines share the GPU
        engines[flag].warmup()
    tok = engines[False].tokenizer
    prompts = [tok.encode(f"Request {i}: tell me about the Debian package manager and its history.") for i in range(8)]
    probe = engines[False].generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_tok = probe.outputs[0].token_ids[7]
    stop_str = probe.outputs[0].text[len(probe.outputs[0].text) // 2:][:4]
    requests = {
        "greedy": (prompts[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)),
        "stop-token": (prompts[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok], ignore_eos=True)),
        "stop-string": (prompts[0], SamplingParams(temperature=0, max_tokens=20, stop=[stop_str], ignore_eos=True)),
        "seeded-n2": (prompts[2], SamplingParams(temperature=0.8, top_p=0.9, seed=11, n=2, max_tokens=33, ignore_eos=True)),
        "logprobs": (prompts[3], SamplingParams(temperature=0, max_tokens=25, logprobs=4, ignore_eos=True)),
        "min-tokens": (prompts[4], SamplingParams(temperature=0.7, seed=5, max_tokens=30, min_tokens=10)),
        "penalty": (prompts[5], SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.2, ignore_eos=True)),
        "late-1": (prompts[6], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
        "late-2": (prompts[7], SamplingParams(temperature=0.5, seed=2, max_tokens=24, ignore_eos=True)),
    }
    arrivals = {"late-1": 10, "late-2": 25}
    got = {flag: drive(engines[flag], requests, arrivals) for flag in (False, True)}
    bad = [rid for rid in requests if view(got[False][rid]) != view(got[True][rid])]
    for rid in requests:
        o = got[True][rid].outputs[0]
        print(f"  {rid}: {len(o.token_ids)} tokens, {o.finish_reason}{'  MISMATCH' if rid in bad else ''}")

    print("| mode | 64 requests × 128 tokens: wall s | decode steps | tok/s |")
    print("|---|---|---|---|")
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    many = [tok.encode(f"Question {i}: why is the sky blue?") for i in range(64)]
    for flag in (False, True):
        eng = engines[flag]
        eng.generate(many[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        torch.cuda.synchronize()
        steps0 = eng.runner.static_decode.steps if eng.runner.static_decode else 0
        t0 = time.perf_counter()
        outs = eng.generate(many, params)
        wall = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        steps = (eng.runner.static_decode.steps if eng.runner.static_decode else 0) - steps0
        print(f"| {'async' if flag else 'sync'} | {wall:.3f} | {steps} | {n / wall:.1f} |")
        eng.block_manager.check_all_free()
    print("PASS" if not bad else f"FAIL: {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
