"""GPU check and timing of speculative decoding by n-gram lookup (`--speculative-config`).

    python scripts/spec_decode_check.py [--model DIR] [--k 4]     # default: the bundled model

1. Check (float32, so that the verifying rows' prefill kernel and the decode kernel's different
   rounding should not flip a greedy token): greedy requests through an engine with drafts (its
   verifying rows attending as decode rows, and as chunks) and one without end with the same
   tokens; every page comes back.
2. Timing (the served dtype): the same requests, one at a time (batch 1) and eight at once,
   without drafts, with drafts, and with drafts whose verifying rows attend as the chunk they are
   instead of as decode rows (`ModelRunner.verify_as_decode`); tokens/s of the whole run, and the
   acceptance rate. Workloads: "echo" prompts that end with the model's own earlier answer to them
   (the answer's n-grams are in the context, as when an answer quotes a document), and "fresh"
   prompts (drafts mostly wrong: what they cost); greedy, and "echo, sampled" with the bundled
   model's generation defaults (temperature 0.7, top_p 0.9, repetition_penalty 1.2).

Medians of 3 runs after a warm-up run. Prints tables; exits 1 if the check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.model.init_model import ensure_default_model

TOPICS = ["the Debian package manager", "the history of the printing press", "how a compiler works",
          "the water cycle", "the rules of chess", "a recipe for bread", "the solar system", "TCP congestion control"]


def engine(model: str, k: int, dtype: str, device: str, as_decode: bool = True) -> LLMEngine:
    """as_decode: verifying rows' tokens attend as decode rows (the engine's way), else as the
    (1 + k)-token chunk they are (the prefill kernel)."""
    e = LLMEngine(EngineArgs(model=model, device=device, dtype=dtype, num_pages=4096, max_num_seqs=16,
                             num_speculative_tokens=k, prompt_lookup_min=1 if k else 2))
    e.runner.verify_as_decode = as_decode
    e.warmup()
    return e


def timed(e: LLMEngine, prompts: list[list[int]], batch: int, max_tokens: int,
          sampled: bool = False) -> tuple[float, int]:
    # sampled: the bundled model's generation defaults (temperature 0.7, top_p 0.9, repetition 1.2)
    params = (SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2, max_tokens=max_tokens,
                             ignore_eos=True) if sampled else
              SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        for out in e.generate(prompts[i:i + batch], params):
            tokens += len(out.outputs[0].token_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the script)")
    args = ap.parse_args()
    model = args.model or str(ensure_default_model())

    # 1. check (both ways of attending verifying rows)
    plain = engine(model, 0, "float32", args.device)
    specs = {"as decode rows": engine(model, args.k, "float32", args.device),
             "as chunks": engine(model, args.k, "float32", args.device, as_decode=False)}
    tok = plain.tokenizer
    fresh = [tok.encode(f"Tell me about {t}.") for t in TOPICS]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    first = plain.generate(fresh, greedy)
    echo = [p + o.outputs[0].token_ids + p for p, o in zip(fresh, first)]
    ok = True
    for name, prompts in (("fresh", fresh), ("echo", echo)):
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy)]
        for how, spec in specs.items():
            got = [o.outputs[0].token_ids for o in spec.generate(prompts, greedy)]
            same = sum(a == b for a, b in zip(got, want))
            print(f"check {name}, verifying {how}: {same}/{len(prompts)} requests with the plain engine's tokens")
            ok &= same == len(prompts)
    for how, spec in specs.items():
        s = spec.stats()
        print(f"check, verifying {how}: drafts {s.spec_decode_num_drafts_total}, draft tokens "
              f"{s.spec_decode_num_draft_tokens_total}, accepted {s.spec_decode_num_accepted_tokens_total}")
        spec.block_manager.check_all_free()
    plain.block_manager.check_all_free()
    del plain, spec, specs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 2. timing
    dtype = "auto"
    engines = {"plain": engine(model, 0, dtype, args.device), "decode": engine(model, args.k, dtype, args.device),
               "chunks": engine(model, args.k, dtype, args.device, as_decode=False)}
    print(f"\n| workload | batch | plain tok/s | k={args.k} tok/s | ratio | k={args.k}, verifying as chunks tok/s | "
          "ratio | accepted / draft tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, prompts, sampled in (("echo", echo, False), ("fresh", fresh, False), ("echo, sampled", echo, True)):
        for batch in (1, 8):
            rates, acc = {}, ""
            for k, e in engines.items():
                timed(e, prompts[:batch], batch, args.max_tokens, sampled)  # warm-up
                before = e.stats()
                runs = [timed(e, prompts, batch, args.max_tokens, sampled) for _ in range(3)]
                rates[k] = statistics.median(n / t for t, n in runs)
                if k == "decode":
                    after = e.stats()
                    d = after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
                    a = after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
                    acc = f"{a}/{d} = {a / max(d, 1):.0%}"
            p = rates["plain"]
            print(f"| {name} | {batch} | {p:.0f} | {rates['decode']:.0f} | {rates['decode'] / p:.2f}x | "
                  f"{rates['chunks']:.0f} | {rates['chunks'] / p:.2f}x | {acc} |")
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
