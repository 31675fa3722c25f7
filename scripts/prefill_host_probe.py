"""Host time of an NSA prefill call (paper shape, one sequence, 8k and 64k), the saved previous kernel
file against the current one: `plan_prefill` alone (its table upload included), the call's dispatch
without a sync, and dispatch + device time — once with the plan made inside the call, once with a
plan made beforehand (as an engine step makes it for all layers). Medians (min) of 7.

    cp <previous>/kernels/nsa_prefill.py kernels/nsa_prefill_prev.py   # ignored; carry it to the GPU
    python3 scripts/prefill_host_probe.py

Run from the repo root with `kernels/` importable as `nsa_kernels` (scripts/device_env.sh).
"""
import time, statistics, importlib, torch
from nsa_kernels.bench_prefill import PAPER, make_inputs
for S in (8192, 65536):
    q, gates, layer, bt = make_inputs(S)
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda"); sl = torch.tensor([S], dtype=torch.int32, device="cuda")
    for name in ("nsa_prefill_prev", "nsa_prefill"):
        mod = importlib.import_module("nsa_kernels." + name)
        cfg = mod.default_config(q.device)
        mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER); torch.cuda.synchronize()
        res = {"plan": [], "dispatch": [], "total": [], "dispatch_planned": [], "total_planned": []}
        for _ in range(7):
            t0 = time.perf_counter(); plan = mod.plan_prefill([0, S], [S], page_size=64, group=16, device=q.device, config=cfg); torch.cuda.synchronize(); res["plan"].append(time.perf_counter() - t0)
            torch.cuda.synchronize(); t0 = time.perf_counter(); mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
            res["dispatch"].append(t1 - t0); res["total"].append(t2 - t0)
            t0 = time.perf_counter(); mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER, plan=plan); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
            res["dispatch_planned"].append(t1 - t0); res["total_planned"].append(t2 - t0)
        print(S, name, " ".join(f"{k} {statistics.median(v)*1e3:.2f}ms(min {min(v)*1e3:.2f})" for k, v in res.items()), flush=True)
    del q, gates, layer, bt; torch.cuda.empty_cache()
