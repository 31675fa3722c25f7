"""Benchmark: Triton NSA prefill vs torch SDPA causal, one sequence, paper shape, bf16.

    python -m nsa_kernels.bench_prefill [--lens 8192,16384,...] [--sweep] [--config rows_cmp=32,...]

Prints, per prompt length: SDPA causal with V padded to Dk (FlashAttention's fast path needs equal
head dims), SDPA with Dv = 128 as is (whatever backend torch picks), NSA prefill in one chunk, and
at 64k NSA prefill as 4k and 8k chunks (each chunk a separate call that reads the earlier ones from
the cache). Ratios are against the faster SDPA variant measured in the same run. Inputs are random
normal (never zeros); pages are shuffled. Times are medians of CUDA-event timings after warm-up.
Each NSA call is given its `plan_prefill` (host-side tile tables), made before the timing as an
engine step makes it once for all layers; its host time is printed in its own column.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from .nsa_prefill import PrefillConfig, nsa_prefill, plan_prefill
from .paged import PagedLayerCache
from .reference import SparsityParams

PAPER = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `reps` calls of fn (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def make_inputs(S, Hq=64, Hkv=4, Dk=192, Dv=128, p=PAPER, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    P, E = p.select_block, p.select_block // p.stride
    npg = -(-S // P)
    dev = "cuda"
    layer = PagedLayerCache(torch.randn(npg + 1, Hkv, P, Dk, device=dev, dtype=dtype),
                            torch.randn(npg + 1, Hkv, P, Dv, device=dev, dtype=dtype),
                            torch.randn(npg + 1, Hkv, E, Dk, device=dev, dtype=dtype),
                            torch.randn(npg + 1, Hkv, E, Dv, device=dev, dtype=dtype))
    bt = (torch.randperm(npg, device=dev) + 1).int().unsqueeze(0)
    q = torch.randn(S, Hq, Dk, device=dev, dtype=dtype)
    gates = torch.rand(S, Hq, 3, device=dev, dtype=dtype)
    return q, gates, layer, bt


def nsa_call(q, gates, layer, bt, S, chunk, p, cfg):
    """Prefill S tokens in chunks of `chunk` (one call each) and return a closure that runs them all.
    Each call gets its `plan_prefill` made beforehand, as an engine step makes it once for all
    layers: the host-side tile layout is per step, not per layer (its time: `plan_ms`)."""
    bounds = list(range(0, S, chunk)) + [S]
    dev = q.device
    calls = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cu = torch.tensor([0, b - a], dtype=torch.int32, device=dev)
        sl = torch.tensor([b], dtype=torch.int32, device=dev)
        plan = plan_prefill([0, b - a], [b], page_size=layer.page_size, group=q.shape[1] // layer.k_cache.shape[1],
                            device=dev, config=cfg)
        calls.append((q[a:b], gates[a:b], cu, sl, plan))

    def run():
        for qq, gg, cu, sl, plan in calls:
            nsa_prefill(qq, gg, layer, bt, cu, sl, p, config=cfg, plan=plan)
    return run


def plan_ms(S, cfg, reps: int = 7) -> float:
    """Median host milliseconds of one `plan_prefill` for a one-chunk prompt of S tokens (it ends
    with the upload of its tables, so the device copy is included)."""
    import time
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        plan_prefill([0, S], [S], page_size=PAPER.select_block, group=16, device="cuda", config=cfg)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_calls(S, Hq=64, Dk=192, Dv=128, dtype=torch.bfloat16):
    q = torch.randn(1, Hq, S, Dk, device="cuda", dtype=dtype)
    k = torch.randn(1, Hq, S, Dk, device="cuda", dtype=dtype)
    v = torch.randn(1, Hq, S, Dv, device="cuda", dtype=dtype)
    vpad = F.pad(v, (0, Dk - Dv))
    return (lambda: F.scaled_dot_product_attention(q, k, vpad, is_causal=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def profile_kernels(fn):
    """Per-kernel CUDA time (ms) of one call of fn, by kernel name."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:40]] = t / 1000.0
    return out


def parse_config(text: str) -> PrefillConfig:
    kw = dict(item.split("=") for item in text.split(",") if item)
    return PrefillConfig(**{k: int(v) for k, v in kw.items()})


SWEEP = [  # tried at 64k with --sweep; the fastest is then used for the table
    "",
    "cmp_packed=0",
    "rows_cmp=128,warps_cmp=8,stages_cmp=3",
    "score_sums=0",
    "score_sums=0,score_parts=3",
    "mask_split=0",
]


def sweep(p, args) -> PrefillConfig:
    """Time each SWEEP config (or --variants) at 64k (per-kernel times from the profiler), --rounds
    times in turn; return the fastest."""
    S = 65536
    q, gates, layer, bt = make_inputs(S)
    best = (math.inf, None)
    configs = args.variants.split(";") if args.variants else SWEEP
    for text in configs * args.rounds:
        try:
            cfg = parse_config(text)
            fn = nsa_call(q, gates, layer, bt, S, S, p, cfg)
            prof = profile_kernels(fn)
            t = timed(fn, 3)
            print(f"  sweep [{text or 'default'}]: {t:.2f} ms  " +
                  " ".join(f"{k.split('_kernel')[0].strip('_')}={v:.2f}" for k, v in prof.items()
                           if "_kernel" in k), flush=True)
            best = min(best, (t, text), key=lambda x: x[0])
        except Exception as exc:  # a config that does not compile or fit
            print(f"  sweep [{text}]: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    del q, gates, layer, bt
    torch.cuda.empty_cache()
    print(f"fastest at 64k: [{best[1] or 'default'}] {best[0]:.2f} ms", flush=True)
    return parse_config(best[1] or "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--sweep", action="store_true", help="try SWEEP tile configs at 64k, keep the fastest")
    ap.add_argument("--variants", default="", help="with --sweep: configs to try instead of SWEEP, "
                    "';'-separated (an empty item is the default)")
    ap.add_argument("--rounds", type=int, default=1, help="with --sweep: time the configs this many times in turn")
    ap.add_argument("--config", default="", help="PrefillConfig fields, e.g. rows_cmp=128,warps_cmp=8")
    args = ap.parse_args()
    p = PAPER
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, paper shape "
          f"(Hq 64, Hkv 4, dk 192, dv 128, l 32, d 16, l' 64, n 16, w 512), bf16", flush=True)
    cfg = sweep(p, args) if args.sweep else parse_config(args.config)
    print(f"config {cfg}", flush=True)
    rows = []
    for S in [int(x) for x in args.lens.split(",")]:
        reps = 3 if S >= 65536 else 5
        sd_pad, sd_raw = sdpa_calls(S)
        t_pad = timed(sd_pad, reps)
        try:
            t_raw = timed(sd_raw, reps)
        except RuntimeError as exc:  # no backend for dk != dv
            print(f"SDPA dv=128 failed: {exc}")
            t_raw = math.inf
        del sd_pad, sd_raw
        torch.cuda.empty_cache()
        q, gates, layer, bt = make_inputs(S)
        torch.cuda.reset_peak_memory_stats()
        one = nsa_call(q, gates, layer, bt, S, S, p, cfg)
        t_one = timed(one, reps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        base = min(t_pad, t_raw)
        row = dict(S=S, sdpa_pad=t_pad, sdpa_raw=t_raw, nsa=t_one, speedup=base / t_one, peak=peak,
                   plan=plan_ms(S, cfg))
        prof = profile_kernels(one)
        row["kernels"] = {k.split("_kernel")[0].strip("_"): round(v, 2) for k, v in prof.items()
                          if "_kernel" in k}
        if S == 65536:
            row["c4k"] = timed(nsa_call(q, gates, layer, bt, S, 4096, p, cfg), reps)
            row["c8k"] = timed(nsa_call(q, gates, layer, bt, S, 8192, p, cfg), reps)
        print(row, flush=True)
        rows.append(row)
        del q, gates, layer, bt, one
        torch.cuda.empty_cache()

    print("\n| prompt | SDPA causal, V padded to 192 (ms) | SDPA causal, dv 128 (ms) "
          "| NSA prefill one chunk (ms) | speedup vs faster SDPA | NSA per kernel (ms) | NSA peak GiB "
          "| host plan, once a step (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ks = ", ".join(f"{k} {v:.1f}" for k, v in r["kernels"].items())
        print(f"| {r['S'] // 1024}k | {r['sdpa_pad']:.1f} | {r['sdpa_raw']:.1f} | {r['nsa']:.1f} | "
              f"{r['speedup']:.2f}× | {ks} | {r['peak']:.1f} | {r['plan']:.1f} |")
    for r in rows:
        if "c4k" in r:
            print(f"\n64k chunked: one chunk {r['nsa']:.1f} ms, 8k chunks {r['c8k']:.1f} ms "
                  f"({r['c8k'] / r['nsa']:.2f}×), 4k chunks {r['c4k']:.1f} ms ({r['c4k'] / r['nsa']:.2f}×)")


if __name__ == "__main__":
    main()
