"""Where a one-chunk NSA prefill call's time goes besides its kernels (paper shape, one sequence).

For each length: the call's CUDA-event time and its host dispatch time (the call returning, before a
sync), medians of --reps after a warm-up; then one profiled call: the span from its first kernel's
start to its last kernel's end, the kernels' summed time, and the largest idle gaps between kernels,
each with how long after the previous kernel ended the host launched the next one (a launch late by
about the gap means the host held the GPU up; a launch early means the wait was on the device side).
Written for the fifty-eighth session's question: 128k took 8 ms longer on Triton 3.9 than on 3.6 with
equal kernel sums.

    python3 scripts/prefill_gap_probe.py --lens 65536,131072

Run from the repo root with `kernels/` importable as `nsa_kernels` (scripts/device_env.sh).
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import triton

from nsa_kernels.bench_prefill import PAPER, make_inputs, nsa_call
from nsa_kernels.nsa_prefill import default_config


def kernel_gaps(fn, top: int):
    """Profile one call of fn; return (span ms, kernel sum ms, kernels, [(gap µs, launch lag µs, name)])."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    span = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) / 1e3
    busy = sum(e["dur"] for e in kernels) / 1e3
    gaps = []
    for prev, nxt in zip(kernels, kernels[1:]):
        end = prev["ts"] + prev["dur"]
        gap = nxt["ts"] - end
        launch = launches.get(nxt["args"].get("correlation"))
        lag = (launch["ts"] - end) if launch else float("nan")
        gaps.append((gap, lag, nxt["name"][:40]))
    gaps.sort(reverse=True)
    return span, busy, len(kernels), gaps[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    cfg = default_config(torch.device("cuda"))
    for S in [int(x) for x in args.lens.split(",")]:
        q, gates, layer, bt = make_inputs(S)
        run = nsa_call(q, gates, layer, bt, S, S, PAPER, cfg)
        run()
        torch.cuda.synchronize()
        ev, host = [], []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a.record()
            run()
            b.record()
            host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            ev.append(a.elapsed_time(b))
        span, busy, n, gaps = kernel_gaps(run, args.top)
        print(f"S {S}: event {statistics.median(ev):.2f} ms (min {min(ev):.2f}, max {max(ev):.2f}); host "
              f"dispatch {statistics.median(host):.2f} ms; profiled call: {n} kernels, span {span:.2f} ms, "
              f"kernels {busy:.2f} ms, idle {span - busy:.2f} ms", flush=True)
        for gap, lag, name in gaps:
            print(f"    gap {gap:8.1f} µs before {name:40s} launched {lag:8.1f} µs after the previous kernel ended",
                  flush=True)
        del q, gates, layer, bt, run
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
