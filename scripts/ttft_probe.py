"""Time to first token of long prompts in the real engine, one at a time and then together (GPU).

    python3 scripts/ttft_probe.py [--len 65536] [--repeat 3] [--together 8] [--max-tokens 2] [--util 0.9]
        [--keys FILE]

The paper-1b preset with random weights. Prints each single prompt's TTFT, then the TTFTs of
`--together` prompts sent at once, and after each phase the torch allocator's retries (a retry is
an allocation that failed, freed every cached block and tried again: slow, and a sign the pool
leaves the activations too little room) and the Triton kernels compiled during the phase (with
`--keys`, their specialisation keys, new and some already known, are written to FILE).
`--max-tokens` gives the prompts sent together more output tokens, so the first ones decode beside
the later ones' prompt chunks (as `nsa-serve bench` and the load tester's runs do).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.bench import build_model
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams


def keys() -> dict[str, set]:
    """The specialisation keys cached per Triton JIT function of the project's modules (a function
    imported into several modules counts once)."""
    from triton.runtime.jit import JITFunction

    out = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith(("nsa_kernels", "nsa_serve")):
            for obj in vars(mod).values():
                if isinstance(obj, JITFunction):
                    out[obj.fn.__qualname__ + "@" + obj.fn.__module__] = {
                        str(k) for c in obj.device_caches.values() for k in c[0]}
    return out


def grown(before: dict[str, set], after: dict[str, set]) -> str:
    """Kernel variants compiled between two `keys()`: function +count."""
    return ", ".join(f"{fn.split('@')[0]} +{len(ks - before.get(fn, set()))}" for fn, ks in sorted(after.items())
                     if ks - before.get(fn, set())) or "none"


def run(engine, prompts, max_tokens: int) -> list[float]:
    t0 = time.time()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.time_ns()}-{i}", p, params, arrival_time=t0)
    ttft = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                ttft.append(o.metrics.first_token_time - o.metrics.arrival_time)
    return sorted(ttft)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--together", type=int, default=8)
    ap.add_argument("--util", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=2, help="output tokens of the prompts sent together")
    ap.add_argument("--keys", help="write the specialisation keys each phase added to this file")
    a = ap.parse_args()
    ns = argparse.Namespace(model=None, preset="paper-1b", set=None, input_len=a.len, output_len=8, seed=0)
    model, tok, name = build_model(ns, torch.device("cuda"), torch.bfloat16)
    engine = LLMEngine(EngineArgs(device="cuda", gpu_memory_utilization=a.util, enable_prefix_caching=False),
                       model=model, tokenizer=tok, model_name=name)
    t = time.perf_counter()
    engine.warmup()
    print(f"{torch.cuda.get_device_name()}: {engine.block_manager.num_pages} pages, warm-up {time.perf_counter() - t:.1f} s, "
          f"chunk {engine.chunk_cap}", flush=True)
    rng = random.Random(0)
    V = model.cfg.vocab_size
    for phase, n in [(f"single #{i + 1}", 1) for i in range(a.repeat)] + [(f"{a.together} together", a.together)]:
        r0, k0 = torch.cuda.memory_stats().get("num_alloc_retries", 0), keys()
        ttft = run(engine, [[rng.randrange(8, V) for _ in range(a.len)] for _ in range(n)],
                   a.max_tokens if n > 1 else 2)
        r1, k1 = torch.cuda.memory_stats().get("num_alloc_retries", 0), keys()
        if a.keys:
            with open(a.keys, "a") as f:
                for fn, ks in k1.items():
                    for k in sorted(ks - k0.get(fn, set())):
                        f.write(f"{phase}\t{fn}\tnew: {k}\n")
                    if ks - k0.get(fn, set()):
                        for k in sorted(k0.get(fn, set()))[:3]:
                            f.write(f"{phase}\t{fn}\tknown: {k}\n")
        print(f"{phase}: TTFT s {' '.join(f'{x:.2f}' for x in ttft)} (mean {statistics.fmean(ttft):.2f}); "
              f"allocator retries {r1 - r0}; kernels compiled: {grown(k0, k1)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
