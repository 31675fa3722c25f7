"""φ in a decode step, paper-1b shape: the gather + `phi_pair` + write path against
`nsa_kernels.phi_decode.phi_write_pair`, timed as a decode graph runs them.

Each variant is captured in one CUDA graph that runs it for 16 layers' worth of distinct weights
(4.7 MB of stacked φ weights a layer, so no call finds its weights in L2), replayed; the table gives
the median per call. Both paths' summaries are compared first (they are the same products; the
fused one rounds once instead of after each step). Run on a GPU from the repo root with
`scripts/device_env.sh` sourced:

    python3 scripts/phi_decode_bench.py [--rows 1 8 16 64] [--variants s4:p3 s8:p3 ...]
    ncu --profile-from-start off --set full -o /tmp/phi python3 scripts/phi_decode_bench.py --ncu 16

A variant is sS:pP[:tT] (`phi_write_pair`'s `splits` S, `stages` P and `row_tiles` T, the 64-row
tiles a partial program walks; default 1); a trailing ":first" times the
first launch alone (the finish replaced by nothing, so its output is not checked). Every other
variant's summaries are compared with the gather path's (the worst is printed). "none done": the
default when no row completes a block (every entry slot on the skip page, as in most decode
steps), where nothing is read.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

from nsa_kernels.cache_write import gather_block_pair, write_kv_pair
import nsa_kernels.phi_decode as phi_decode
from nsa_kernels.phi_decode import phi_write_pair
from nsa_serve.model.config import preset
from nsa_serve.model.nsa_model import NSAAttention

LAYERS = 16


def graph_median(fn, reps: int = 40) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(LAYERS):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(LAYERS):
            fn(i)
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return statistics.median(times)


def parse(v: str):
    """"s8:p3[:tT][:first]" → (phi_write_pair knobs, first launch only)."""
    f = v.split(":")
    knobs = dict(splits=int(f[0][1:]), stages=int(f[1][1:]))
    for extra in f[2:]:
        if extra.startswith("t"):
            knobs["row_tiles"] = int(extra[1:])
        elif extra != "first":
            raise ValueError(f"unknown variant field {extra!r} in {v!r}")
    return knobs, f[-1] == "first"


class _Nothing:
    def __getitem__(self, grid):
        return lambda *args, **kw: None


@contextlib.contextmanager
def no_finish():
    """The finish launch replaced by nothing: what is left is the first launch's time."""
    saved = phi_decode._phi_finish_kernel
    phi_decode._phi_finish_kernel = _Nothing()
    try:
        yield
    finally:
        phi_decode._phi_finish_kernel = saved


def profile_one(k, v, weights, N, pages, P, E, lb):
    """One `phi_write_pair` call with every row writing, warmed up, the weights flushed from the L2
    (as in a decode step that reads 16 layers), alone between profiler start and stop."""
    slots = torch.randint(0, pages * P, (N, lb), device=k.device)
    entries = torch.randperm(pages * E, device=k.device)[:N]
    kc = torch.zeros(pages, k.shape[1], E, k.shape[3], device=k.device, dtype=k.dtype)
    vc = torch.zeros(pages, v.shape[1], E, v.shape[3], device=v.device, dtype=v.dtype)
    for _ in range(3):
        phi_write_pair(k, v, slots, kc, vc, entries, *weights)
    torch.empty(256 << 20, dtype=torch.uint8, device=k.device).zero_()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    phi_write_pair(k, v, slots, kc, vc, entries, *weights)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 16, 64], help="sequences (each 4 kv heads)")
    ap.add_argument("--variants", nargs="*", default=[
        "s4:p3", "s8:p3", "s16:p3", "s4:p2", "s8:p2", "s4:p3:first", "s8:p3:first"])
    ap.add_argument("--ncu", type=int, default=None, metavar="N",
                    help="instead of the table: one default call at N sequences (the L2 flushed first) "
                         "between cudaProfilerStart/Stop, for `ncu --profile-from-start off`")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = preset("paper-1b")
    torch.manual_seed(0)
    m = NSAAttention(cfg).to(dev, dt)
    weights = []  # LAYERS sets of stacked φ weights (fuse_phi copies them each time)
    for _ in range(LAYERS):
        with torch.no_grad():
            for p in (*m.phi_k.parameters(), *m.phi_v.parameters()):
                p.normal_(std=p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0)
        m.fuse_phi()
        weights.append(m.phi_pair_weights())
    H, Dk, Dv, lb, P, E = cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.cmp_block, 64, 4
    pages = 4096
    k = torch.randn(pages, H, P, Dk, device=dev, dtype=dt)
    v = torch.randn(pages, H, P, Dv, device=dev, dtype=dt)
    if a.ncu is not None:
        profile_one(k, v, weights[0], a.ncu, pages, P, E, lb)
        return
    combos = [parse(v) for v in a.variants]
    print(f"paper-1b φ (mlp, l = {lb}, dk {Dk}, dv {Dv}, {H} kv heads), µs a layer, median of graph replays")
    print(f"{'seqs':>5s} {'gather+phi_pair+write':>22s} {'fused (default)':>16s} " +
          " ".join(f"{v:>{max(7, len(v))}s}" for v in a.variants) +
          f" {'× before':>9s} {'worst |Δ|/max':>11s} {'none done':>10s}")
    for N in a.rows:
        slots = torch.randint(0, pages * P, (N, lb), device=dev)
        entries = torch.randperm(pages * E, device=dev)[:N]
        kc = [torch.zeros(pages, H, E, Dk, device=dev, dtype=dt) for _ in range(2)]
        vc = [torch.zeros(pages, H, E, Dv, device=dev, dtype=dt) for _ in range(2)]

        def before(i, kc=kc[0], vc=vc[0], slots=slots, entries=entries, N=N):
            w1, b, w2 = weights[i]  # NSAAttention.phi_pair's products
            hid = torch.bmm(F.silu(torch.baddbmm(b, gather_block_pair(k, v, slots), w1)), w2)
            write_kv_pair(kc, vc, hid[0, :, :Dk].view(N, H, -1), hid[1, :, :Dv].view(N, H, -1), entries)

        def fused(i, kc=kc[1], vc=vc[1], slots=slots, entries=entries, **knobs):
            phi_write_pair(k, v, slots, kc, vc, entries, *weights[i], **knobs)

        before(0)
        fused(0)
        e = entries.long()
        ref = torch.cat([kc[0][e // E, :, e % E].flatten(), vc[0][e // E, :, e % E].flatten()]).double()

        def error():
            got = torch.cat([kc[1][e // E, :, e % E].flatten(), vc[1][e // E, :, e % E].flatten()]).double()
            return ((got - ref).abs().max() / ref.abs().max()).item()

        err = error()
        for knobs, first in combos:  # every full variant's summaries, the worst kept
            if not first:
                kc[1].zero_()
                vc[1].zero_()
                fused(0, **knobs)
                err = max(err, error())
        t0 = graph_median(before)
        t1 = graph_median(fused)
        ts = []
        for knobs, first in combos:
            with no_finish() if first else contextlib.nullcontext():
                ts.append(graph_median(lambda i, knobs=knobs: fused(i, **knobs)))
        none = torch.full_like(entries, (pages - 1) * E)  # no row completes a block: all on the skip page
        t_skip = graph_median(lambda i: phi_write_pair(k, v, slots, kc[1], vc[1], none, *weights[i],
                                                       skip_page=pages - 1))
        print(f"{N:5d} {t0:22.2f} {t1:16.2f} " + " ".join(f"{t:{max(7, len(v))}.2f}" for t, v in zip(ts, a.variants)) +
              f" {t0 / t1:8.2f}× {err:11.2e} {t_skip:10.2f}", flush=True)


if __name__ == "__main__":
    main()
