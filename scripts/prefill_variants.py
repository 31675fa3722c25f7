"""Time NSA prefill variants at one prompt length (paper shape, one chunk) against each other in one
process, and check each against the first variant's output and selection.

    python3 scripts/prefill_variants.py --len 65536 --rounds 2 \
        "prev=nsa_prefill_prev:" "default=nsa_prefill:" "parts2=nsa_prefill:score_parts=2"

A variant is NAME=MODULE:CONFIG — MODULE a module of nsa_kernels with `nsa_prefill` and
`PrefillConfig` (e.g. a saved copy of the previous kernel file), CONFIG PrefillConfig fields.
Times: medians of CUDA-event timings (5 calls) after a warm-up, each round visiting every variant
in turn; per-kernel ms from the torch profiler in the first round. Inputs are random normal, pages
shuffled (bench_prefill.make_inputs). Run from the repo root with `kernels/` importable as
`nsa_kernels` (scripts/device_env.sh).
"""

import argparse
import importlib

import torch

from nsa_kernels.bench_prefill import PAPER, make_inputs, profile_kernels, timed

ap = argparse.ArgumentParser()
ap.add_argument("variants", nargs="+")
ap.add_argument("--len", type=int, default=65536)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--chunks", default="", help="also time the prompt in chunks of these sizes (one call "
                "each), e.g. 8192,4096")
a = ap.parse_args()
S = a.len
q, gates, layer, bt = make_inputs(S)
cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
sl = torch.tensor([S], dtype=torch.int32, device="cuda")
runs = []
for v in a.variants:
    name, rest = v.split("=", 1)
    mod_name, cfg_text = rest.split(":", 1)
    mod = importlib.import_module(f"nsa_kernels.{mod_name}")
    kw = dict(item.split("=") for item in cfg_text.split(",") if item)
    cfg = mod.PrefillConfig(**{k: int(x) for k, x in kw.items()})
    runs.append((name, mod, cfg))

ref_out = ref_sel = None
print(f"device {torch.cuda.get_device_name()}, prompt {S}, paper shape, bf16", flush=True)
for name, mod, cfg in runs:
    out, sel = mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER, config=cfg, return_selection=True)
    torch.cuda.synchronize()
    if ref_out is None:
        ref_out, ref_sel = out.float(), sel
        print(f"{name}: reference for the checks", flush=True)
        continue
    err = ((out.float() - ref_out).norm() / ref_out.norm()).item()
    same = (torch.sort(sel, -1).values == torch.sort(ref_sel, -1).values).all(-1).float().mean().item()
    print(f"{name}: rel. error vs {runs[0][0]} {err:.2e}, rows×groups with the same selected set {same:.6f}",
          flush=True)
    del out, sel



def chunked(mod, cfg, chunk):
    """The prompt in chunks of `chunk` tokens, one call each (as bench_prefill.nsa_call)."""
    calls = []
    for lo in range(0, S, chunk):
        hi = min(S, lo + chunk)
        calls.append((q[lo:hi], gates[lo:hi], torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda"),
                      torch.tensor([hi], dtype=torch.int32, device="cuda")))

    def run():
        for qq, gg, c, s in calls:
            mod.nsa_prefill(qq, gg, layer, bt, c, s, PAPER, config=cfg)
    return run


times = {name: [] for name, _, _ in runs}
kern = {}
for rnd in range(a.rounds):
    for name, mod, cfg in runs:
        fn = lambda: mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER, config=cfg)  # noqa: E731
        if rnd == 0:
            kern[name] = {k.split("_kernel")[0].strip("_"): v for k, v in profile_kernels(fn).items()
                          if "_kernel" in k}
        times[name].append(timed(fn, 5))
        print(f"round {rnd} {name}: {times[name][-1]:.2f} ms", flush=True)
        for c in [int(x) for x in a.chunks.split(",") if x]:
            t = timed(chunked(mod, cfg, c), 3)
            times.setdefault(f"{name} in {c} chunks", []).append(t)

print("\n| variant | ms (each round) | per kernel (ms, profiler) |")
print("|---|---|---|")
for name, _, cfg in runs:
    ks = ", ".join(f"{k} {v:.2f}" for k, v in kern[name].items())
    print(f"| {name} | {' / '.join(f'{t:.2f}' for t in times[name])} | {ks} |")
    for c in [int(x) for x in a.chunks.split(",") if x]:
        tc = times[f"{name} in {c} chunks"]
        print(f"| {name}, {c}-token chunks | {' / '.join(f'{t:.2f}' for t in tc)} "
              f"({' / '.join(f'{x / y:.2f}×' for x, y in zip(tc, times[name]))} one call) | |")
