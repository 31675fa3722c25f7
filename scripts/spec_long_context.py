"""What speculative decoding's verifying rows cost at long context, on the GPU: decode steps of a
random-initialised paper-shape model (`--preset paper-1b`: 64 q heads, 4 kv heads, dk 192, dv 128)
after long prompts, without drafts, with drafts whose verifying rows attend as decode rows (the
engine's way on CUDA), and with the same rows attending as the (1 + k)-token chunks they are
(the prefill kernel).

    python scripts/spec_long_context.py [--context 32768] [--batch 1 8] [--k 4]

Prompts: a random 512-token passage repeated up to the context, so that n-gram drafts exist. The
model's weights are random: its tokens say nothing, and how many drafts it accepts is whatever it
is (printed). What the table is for is the time of a decode step, verifying or not: it prints the
median step time and tokens/s over the decode steps (after every prompt is prefilled and after
a warm-up request), per variant and batch. Greedy; the served dtype (bf16).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from types import SimpleNamespace

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.bench import build_model
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams

VARIANTS = (("plain", 0, True), ("drafts, verifying as decode rows", None, True),
            ("drafts, verifying as chunks", None, False))


def prompts(n: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        passage = [rng.randrange(8, vocab) for _ in range(512)]
        out.append((passage * (context // 512 + 1))[:context])
    return out


def decode_steps(engine: LLMEngine, batch: list[list[int]], max_tokens: int, tag: str):
    """Runs the requests to the end; returns (step seconds, tokens emitted) of each step taken
    once every request has its first token (every prompt prefilled)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind="delta")
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}-{i}", p, params)
    started, steps = set(), []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        emitted = sum(len(o.outputs[0].delta_token_ids) for o in outs)
        if len(started) == len(batch):
            steps.append((dt, emitted))
        started.update(o.request_id for o in outs if o.outputs[0].num_tokens)
    return steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper-1b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the script)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    margs = SimpleNamespace(model=None, preset=args.preset, set=None, input_len=args.context,
                            output_len=args.max_tokens, seed=0)
    model, _, name = build_model(margs, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    V = model.cfg.vocab_size
    print(f"{name}, context {args.context}, k = {args.k}, {args.max_tokens} tokens a request, greedy\n")
    print("| variant | batch | decode steps | median step ms | decode tok/s | accepted / draft tokens |")
    print("|---|---|---|---|---|---|")
    for label, k, as_decode in VARIANTS:
        k = args.k if k is None else k
        # Pages for the largest batch at full length (not left to the memory probe: every variant
        # gets the same pool).
        pages = max(args.batch) * -(-(args.context + args.max_tokens + k + 64) // model.cfg.select_block) + 16
        engine = LLMEngine(EngineArgs(device=args.device, num_speculative_tokens=k, prompt_lookup_min=1,
                                      num_pages=pages, max_num_seqs=max(args.batch), max_num_batched_tokens=8192,
                                      long_prefill_token_threshold=8192, enable_prefix_caching=False),
                           model=model, model_name=name)
        engine.runner.verify_as_decode = as_decode
        engine.warmup()
        decode_steps(engine, prompts(1, args.context, V, seed=99), 16, f"warm-{label}")
        for b in args.batch:
            before = engine.stats()
            steps = decode_steps(engine, prompts(b, args.context, V, seed=b), args.max_tokens, f"{label}-{b}")
            after = engine.stats()
            d = after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
            a = after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
            wall, toks = sum(s for s, _ in steps), sum(n for _, n in steps)
            med = statistics.median(s for s, _ in steps) * 1e3 if steps else float("nan")
            print(f"| {label} | {b} | {len(steps)} | {med:.2f} | {toks / wall if wall else 0:.0f} | "
                  f"{a}/{d} |", flush=True)
        engine.block_manager.check_all_free()
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
