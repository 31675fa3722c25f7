"""How long one CTA takes to find a kv group's top-n among 1 024 block scores (64k context, the
paper shape's 64-token selection blocks), as a latency: the gate decode.md's thirty-fourth round
set before building a one-launch cluster step for batch 1. In that step every CTA of a cluster
would take the same top-n after gathering the group's scores, so the top-n sits on the step's
critical path whole; the cluster floor (PXTX, `scripts/cluster_floor.cu`) leaves 2.5 µs under
19.2 µs on the H100 for all the arithmetic (decode.md, thirty-fifth round, has this probe's rows).

    python3 scripts/topn_latency_probe.py      # on a GPU, kernels/ importable as nsa_kernels
                                               # (source scripts/device_env.sh)
    TRITON_INTERPRET=1 python3 scripts/topn_latency_probe.py --check   # CPU: the loop's answer

One program loops R times over: keys of the scores (`_topn_keys`, the decode kernels' own) → the
top-n (a mode below) → a tiny change to every score that depends on the answer (so no iteration
can start before the previous one's top-n is known, as the step's next phase cannot). The time
of a launch with R₁ iterations less that with R₀, over R₁ − R₀, is one top-n's latency with no
launch in it, provided both launches take longer on the GPU than the host takes to issue one
(17–31 µs from Python on the H100): `--reps R0 R1` (default 1 129, the thirty-fifth round's rows,
whose R = 1 launches were host-bound, so the table also gives t(R₁) / R₁ as an upper bound;
65 257 keeps both top-n modes above it at either size). Modes: "reduce" (one block-wide max of
the keys: the floor of any dependent iteration), "passes" and "sort" (the decode kernels' TOPN
modes 0 and 1, `_select_units`).
Over 1 024 blocks (one CTA takes the group's whole top-n) and over 128 (the second stage of a
two-stage top-n: each of 8 CTAs takes its own slice's 16 best, the cluster gathers the 128).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from nsa_kernels.bench_prefill import timed
from nsa_kernels.nsa_decode import _topn_blocks, _topn_keys
from nsa_kernels._triton_utils import topn_block

MODES = ("reduce", "passes", "sort")


@triton.jit
def _topn_loop(score_ptr, out_ptr, cur, R, NBP: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr,
               NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, MODE: tl.constexpr):
    j = tl.arange(0, NBP)
    ks = tl.arange(0, NSP)
    score = tl.load(score_ptr + j)
    sel = tl.full([NSP], -1, tl.int32)
    for _ in range(R):
        key = _topn_keys(score, j, cur, NUM_INIT, NUM_LOCAL)
        if MODE == 0:
            sel = tl.where(ks == 0, topn_block(tl.max(key, 0)), -1)
        else:  # the decode kernels' own top-n, TOPN mode MODE − 1
            sel = _topn_blocks(key, j, NBP, NSEL, NSP, MODE - 1)
        # Every score moves by an amount the answer decides (positive scores stay positive; the
        # order barely moves): the next iteration's keys wait for this top-n.
        d = (tl.sum(sel, 0) & 1).to(tl.float32) * 1e-30
        score = score + d
    tl.store(out_ptr + ks, sel)


def run(score: torch.Tensor, cur: int, reps: int, mode: str, nsel: int, num_warps: int) -> torch.Tensor:
    out = torch.empty(16, dtype=torch.int32, device=score.device)
    _topn_loop[(1,)](score, out, cur, reps, NBP=score.numel(), NSEL=nsel, NSP=16, NUM_INIT=1,
                     NUM_LOCAL=2, MODE=MODES.index(mode), num_warps=num_warps)
    return out


def reference(score: torch.Tensor, cur: int, nsel: int) -> list[int]:
    """The top-n the decode reference would take: forced first and last two, then best scores."""
    s = score.double().clone()
    s[cur + 1:] = -1.0
    s[:1] = float("inf")
    s[max(cur - 1, 0):cur + 1] = float("inf")
    order = torch.sort(-s, stable=True).indices
    return order[:nsel].tolist()


def time_us(fn, iters: int = 50, rounds: int = 15) -> float:
    """Median µs of one call, over `rounds` timings of `iters` calls back to back."""
    return timed(lambda: [fn() for _ in range(iters)], rounds) * 1000 / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 128])
    ap.add_argument("--check", action="store_true", help="only check the answer (CPU interpreter)")
    ap.add_argument("--reps", type=int, nargs=2, default=[1, 129], metavar=("R0", "R1"),
                    help="iterations of the two launches whose difference is timed")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(n, generator=g).to(dev) for n in args.blocks}
    for n, score in scores.items():
        want = reference(score.cpu(), n - 1, 16)
        for mode in ("passes", "sort"):
            got = run(score, n - 1, 3, mode, 16, 4).cpu().tolist()
            print(f"{n} blocks, {mode}: top-16 {'matches' if got == want else 'DIFFERS'} the reference")
            if got != want:
                raise SystemExit(f"{mode}: got {got}, want {want}")
    if args.check:
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    r0, r1 = args.reps
    print(f"| blocks | mode | warps | R={r0} µs | R={r1} µs | per top-n µs | upper bound µs |\n"
          "|---|---|---|---|---|---|---|")
    for n, score in scores.items():
        for mode in MODES:
            for warps in (4, 8):
                t0 = time_us(lambda: run(score, n - 1, r0, mode, 16, warps))
                t1 = time_us(lambda: run(score, n - 1, r1, mode, 16, warps))
                print(f"| {n} | {mode} | {warps} | {t0:.2f} | {t1:.2f} | {(t1 - t0) / (r1 - r0):.3f} "
                      f"| {t1 / r1:.3f} |")


if __name__ == "__main__":
    main()
