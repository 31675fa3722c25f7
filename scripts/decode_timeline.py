"""In-graph timeline of one NSA decode step: when each kernel's programs start, pass their PDL wait
and end, from %globaltimer stamps — what the profiler cannot show once PDL overlaps the kernels.

    python3 scripts/decode_timeline.py [--ctx 65536] [--batch 1 --batch 16 ...] [--topn sort --topn cand]
                                       [--variant "" --variant "cmp_warps=8" ...] [--pdl on|off|both]
                                       [--score-phases] [--by-split]

A --variant is nsa_decode_tuned keyword arguments (Python literals, comma-separated; "" = the default).

Instruments a copy of kernels/nsa_decode.py (written to a temporary file, never into the tree): each
program of the compressed pass, the score kernel and the attention kernel stores the time at its
entry, after its griddepcontrol.wait (or where it would be), and at its end. The step is captured
in a CUDA graph (with and without PDL) and replayed after an L2 flush; medians over 25 replays.
Columns per kernel, µs from the first compressed-pass program's entry: first entry / last entry /
last program past its wait / first end / median end / last end. The batch-1 combine launch is not
stamped (it ends before the graph does). The stamps cost a store each; compare the printed graph
time with bench_decode's to see their effect. Needs a CUDA GPU; nsa_kernels importable (as
scripts/device_env.sh sets up). Docs: docs/benchmarks/decode.md, eighth round.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import importlib.util
import os
import re
import sys
import tempfile

import torch

STAMP = '''
@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _stamp(tim_ptr, kid, slot, TIME: tl.constexpr):
    if TIME:
        prog = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(tim_ptr + (kid * 65536 + prog) * 3 + slot, _now())


@triton.jit
def _stamp_sm(tim_ptr, kid, TIME: tl.constexpr):
    if TIME:  # the SM this program runs on (slot 0 of kernel id kid)
        prog = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
        tl.store(tim_ptr + (kid * 65536 + prog) * 3, sm.to(tl.int64))


@triton.jit
def _cmp_tile_kernel('''
ARGS = ", tim_ptr=None, TIME: tl.constexpr = False):"
TIMER = "tim_ptr=timer, TIME=timer is not None, "

# (pattern, replacement, matches): each must match exactly that many times in kernels/nsa_decode.py,
# or the script stops and says which (the kernel changed: update the anchors).
EDITS = [
    (r"\n@triton\.jit\ndef _cmp_tile_kernel\(", "\n" + STAMP, 1),
    (r"(UPCAST: tl\.constexpr, PDL: tl\.constexpr[^)]*)\):(\n    \"\"\"Program \(group, split\) walks)",
     r"\1" + ARGS + r"\2", 1),
    (r"(\n    if PDL:  # launched early .*\n        tl\.extra\.cuda\.gdc_wait\(\)\n)",
     r"\n    _stamp(tim_ptr, 0, 0, TIME)\1    _stamp(tim_ptr, 0, 1, TIME)\n", 1),
    (r"(\n    tl\.store\(pacc_ptr \+ o\[:, None\] \* DV .*\n             mask=.*\n)", r"\1    _stamp(tim_ptr, 0, 2, TIME)\n", 1),
    (r"(TOPN: tl\.constexpr, NPROG_P: tl\.constexpr, KFLAG: tl\.constexpr,\n +PDL: tl\.constexpr)\):(\n    \"\"\"Program \(group, p\))",
     r"\1" + ARGS + r"\2", 1),
    (r"(\n    if PDL:\n        if not KFLAG:\n            tl\.extra\.cuda\.gdc_wait\(\)\n        tl\.extra\.cuda\.gdc_launch_dependents\(\).*\n)",
     r"\n    _stamp(tim_ptr, 1, 0, TIME)\1    _stamp(tim_ptr, 1, 1, TIME)\n", 1),
    (r"(\n                          L, b, sbt_b, NBP, NSEL, NSP, NUM_INIT, NUM_LOCAL, PAGE, TOPN\)\n)",
     r"\1        _stamp(tim_ptr, 1, 2, TIME)\n", 1),  # after the last-arriving program's if/else
    (r"(PDL: tl\.constexpr)\):(\n    \"\"\"Program \(group, split\): its share)", r"\1" + ARGS + r"\2", 1),
    (r"(\n    pid = tl\.program_id\(0\)\n    split = tl\.program_id\(1\)\n    b = pid // Hkv\n    kh = pid % Hkv\n    Hq = Hkv \* G)",
     r"\n    _stamp(tim_ptr, 2, 0, TIME)\n    _stamp_sm(tim_ptr, 6, TIME)\1", 1),
    (r"(\n    if PDL:  # the work list is the score kernel's output\n        tl\.extra\.cuda\.gdc_wait\(\)\n)",
     r"\1    _stamp(tim_ptr, 2, 1, TIME)\n", 1),
    (r"(\n                            NSPLIT_C, NSPLIT, GP, C_CH, S_CH, DV, DVP\)\n)",
     r"\1    _stamp(tim_ptr, 2, 2, TIME)\n", 1),  # the kernel's end, after the fused merge
    # Kernel id 7: slot 1 when a program's own pages are done (all programs), slot 0 when the
    # group's last-arriving split starts the fused merge (after its arrival).
    (r"(\n    o = rows \* NSPLIT \+ split\n)(    _store_partial\(sm_ptr)", r"\1    _stamp(tim_ptr, 7, 1, TIME)\n\2", 1),
    (r"(\n        if arrived == NSPLIT - 1:\n)", r"\1            _stamp(tim_ptr, 7, 0, TIME)\n", 1),
    (r"(score_warps=None[^)]*)\):", r"\1, timer=None):", 1),
    (r"PDL=pdl, (num_warps=(cmp_warps|score_warps|num_warps))", "PDL=pdl, " + TIMER + r"\1", 3),
]
NAMES = ("cmp", "score", "attend")

# --score-phases: stamps inside the score kernel (top-n "cand", the default), as (kernel id, slot)
# pairs after kernel ids 0–2. A point's time is when the program reached that line; the compiler
# may still move a load's wait past it, so a phase's time can show up in the next one.
PHASES = (
    ("normalisers merged", (3, 0)),
    ("tile factors", (3, 1)),
    ("partial sums stored", (3, 2)),
    ("edge stored, barrier", (4, 0)),
    ("own block scores", (4, 1)),
    ("candidates stored", (4, 2)),
    ("arrived (atomic)", (5, 0)),
    ("last: top-n of candidates", (5, 1)),
)
PHASE_EDITS = [
    (r"(\n                                                            BLOCK_L, STRIDE, BN, NSPLIT_P\)\n)",
     r"\1    _stamp(tim_ptr, 3, 0, TIME)\n", 1),
    (r"(\n    f = _tile_factors\(.*\n)", r"\1    _stamp(tim_ptr, 3, 1, TIME)\n", 1),
    (r"(\n)(    cur = \(L - 1\) // PAGE\n    if TOPN == 2:)", r"\1    _stamp(tim_ptr, 3, 2, TIME)\n\2", 1),
    (r"(\n        tl\.debug_barrier\(\)  # this CTA's part and edge stores.*\n)", r"\1        _stamp(tim_ptr, 4, 0, TIME)\n", 1),
    (r"(\n)(        key = _topn_keys\(score, j, cur, NUM_INIT, NUM_LOCAL\)\n)", r"\1        _stamp(tim_ptr, 4, 1, TIME)\n\2", 1),
    (r"(\n        tl\.store\(cand_ptr \+ \(pid \* NPROG \+ prog\) \* NSP \+ ks, top\)\n)",
     r"\1        _stamp(tim_ptr, 4, 2, TIME)\n", 1),
    (r"(\n    arrived = tl\.atomic_add\(cnt_ptr \+ pid, 1\)\n)", r"\1    _stamp(tim_ptr, 5, 0, TIME)\n", 1),
    (r"(\n)(            _store_units\(_blocks_of\(top, NSEL, NSP\))", r"\1            _stamp(tim_ptr, 5, 1, TIME)\n\2", 1),
]


def instrumented_module(score_phases=False):
    import nsa_kernels

    src_path = os.path.join(os.path.dirname(nsa_kernels.__file__), "nsa_decode.py")
    src = open(src_path).read()
    for pat, rep, want in EDITS + (PHASE_EDITS if score_phases else []):
        src, n = re.subn(pat, rep, src)
        if n != want:
            sys.exit(f"decode_timeline: anchor {pat[:60]!r} matched {n} times (not {want}) in {src_path}; "
                     "update EDITS")
    # A real file (Triton reads kernel source through inspect), loaded as a module of the package
    # so its relative imports resolve.
    fd, path = tempfile.mkstemp(suffix="_nsa_decode_timeline.py")
    with os.fdopen(fd, "w") as f:
        f.write(src)
    atexit.register(os.remove, path)
    spec = importlib.util.spec_from_file_location("nsa_kernels._nsa_decode_timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timeline(step, tim, reps=25, score_phases=False, groups=0):
    """Medians over `reps` replays: the six numbers of each kernel (NAMES), then with score_phases
    the median and last time of each PHASES point over the programs that reached it, then with
    `groups` (kv groups, B·Hkv) the attention kernel's median entry / past-wait / end and last end
    of each split; and the graph's bench time."""
    from nsa_kernels.bench_decode import bench, graph_of

    g = graph_of(step)
    flush = torch.empty(1 << 28, dtype=torch.int8, device="cuda")
    rows = []
    for _ in range(reps + 5):
        tim.zero_()
        flush.zero_()
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        t = tim.view(-1, 65536, 3).cpu().double()
        t0 = t[0, :, 0][t[0, :, 0] > 0].min()
        r = []
        for k in range(3):
            x = (t[k][t[k, :, 2] > 0] - t0) / 1e3
            r += [x[:, 0].min(), x[:, 0].max(), x[:, 1].max(), x[:, 2].min(), x[:, 2].median(), x[:, 2].max()]
        if score_phases:
            for _, (k, slot) in PHASES:
                x = (t[k, :, slot][t[k, :, slot] > 0] - t0) / 1e3
                r += [x.median(), x.max()] if x.numel() else [float("nan")] * 2
        if groups:
            # Attention program (group, split) is stamped at group · nsplit + split.
            ok = t[2, :, 2] > 0
            x = (t[2][ok] - t0) / 1e3
            split = torch.nonzero(ok).flatten() % (int(ok.sum()) // groups)
            for sp in range(int(ok.sum()) // groups):
                y = x[split == sp]
                r += [y[:, 0].median(), y[:, 1].median(), y[:, 2].median(), y[:, 2].max()]
            # By how many attention programs ran on the program's SM (%smid, kernel id 6).
            sm = t[6, :, 0][ok].long()
            per_sm = torch.bincount(sm)[sm]
            for k in SM_SHARES:
                y = x[per_sm == k]
                r += [y.shape[0], y[:, 2].median(), y[:, 2].max()] if y.shape[0] else [0, float("nan"), float("nan")]
            # The fused merge: programs that merged (kernel id 7, slot 0), from their own pages done
            # to the merge's start (waiting for the other splits) and to their end.
            mrg = t[7, :, 0] > 0
            if mrg.any():
                done, start, end = ((t[7, :, 1][mrg] - t0) / 1e3, (t[7, :, 0][mrg] - t0) / 1e3,
                                    (t[2, :, 2][mrg] - t0) / 1e3)
                r += [(start - done).median(), (end - start).median(), end.median(), end.max()]
            else:
                r += [float("nan")] * 4
        rows.append([float(v) for v in r])
    return torch.tensor(rows[5:]).median(0).values.tolist(), bench(g.replay)


PDL_MODES = {"both": (True, False), "on": (True,), "off": (False,)}
SM_SHARES = (1, 2, 3)  # --by-split: attention programs grouped by how many ran on their SM


def parse_kwargs(text: str) -> dict:
    """'a=1, b="x"' → {"a": 1, "b": "x"} (values are Python literals)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main(argv=None):
    from nsa_kernels.bench_decode import PAPER_P, SHAPES, make_inputs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--topn", action="append", choices=["passes", "sort", "cand"],
                    help="top-n mode(s) to time (default: the kernel's default)")
    ap.add_argument("--variant", action="append", help="nsa_decode_tuned kwargs, e.g. 'cmp_warps=8'")
    ap.add_argument("--pdl", choices=list(PDL_MODES), default="both", help="PDL on, off or both (default)")
    ap.add_argument("--score-phases", action="store_true",
                    help="also stamp points inside the score kernel (PHASES) and print their times")
    ap.add_argument("--by-split", action="store_true",
                    help="also print the attention kernel's times per split (median entry / past its "
                         "wait / end, last end)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_timeline needs a CUDA GPU")
    mod = instrumented_module(args.score_phases)
    ids = 8  # kernel ids 0–2, the phase points' ids 3–5, the attention programs' SMs (6), merges (7)
    tim = torch.zeros(ids * 65536 * 3, dtype=torch.int64, device="cuda")  # ≤ 65536 programs a kernel
    print(f"paper shape, {args.ctx // 1024}k; µs from the first compressed-pass entry: first entry / last entry / "
          "last past its wait / first end / median end / last end")
    for B in args.batch or (1, 16, 64):
        q, gates, layer, tables, lens = make_inputs(B, args.ctx, **SHAPES["paper"], p=PAPER_P)
        for topn in args.topn or [mod.TOPN_DEFAULT]:
            for variant in args.variant or [""]:
                kw = parse_kwargs(variant)
                for pdl in PDL_MODES[args.pdl]:
                    step = lambda: mod.nsa_decode_tuned(q, gates, layer, tables, lens, PAPER_P,  # noqa
                                                        pdl=pdl, topn=topn, timer=tim, **kw)
                    try:
                        med, us = timeline(step, tim, score_phases=args.score_phases,
                                           groups=B * SHAPES["paper"]["Hkv"] if args.by_split else 0)
                    except Exception as e:  # a variant that does not build is reported, not fatal
                        print(f"B={B:3d} {variant}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        break
                    parts = [f"{n} " + "/".join(f"{v:.1f}" for v in med[6 * i:6 * i + 6])
                             for i, n in enumerate(NAMES)]
                    print(f"B={B:3d} top-n {topn:6s} {variant or 'default'} PDL={'on ' if pdl else 'off'} "
                          f"graph {us:6.1f} µs | " + " | ".join(parts), flush=True)
                    if args.score_phases:
                        ph = med[18:]
                        print("      score phases, median / last µs: " + " | ".join(
                            f"{name} {ph[2 * i]:.1f}/{ph[2 * i + 1]:.1f}" for i, (name, _) in enumerate(PHASES)),
                            flush=True)
                    if args.by_split:
                        sp = med[18 + (2 * len(PHASES) if args.score_phases else 0):-3 * len(SM_SHARES) - 4]
                        print("      attention by split, median entry / past wait / end, last end µs: " + " | ".join(
                            f"{i}: " + "/".join(f"{v:.1f}" for v in sp[4 * i:4 * i + 4])
                            for i in range(len(sp) // 4)), flush=True)
                        sh = med[-3 * len(SM_SHARES) - 4:-4]
                        print("      attention by programs on the SM, count / median end / last end µs: " + " | ".join(
                            f"{k} an SM: {sh[3 * i]:.0f}/{sh[3 * i + 1]:.1f}/{sh[3 * i + 2]:.1f}"
                            for i, k in enumerate(SM_SHARES)), flush=True)
                        mg = med[-4:]
                        print(f"      fused merge, median µs: own pages done → merge start {mg[0]:.2f}, merge "
                              f"{mg[1]:.2f}; merging programs' end median / last {mg[2]:.1f}/{mg[3]:.1f}", flush=True)
        del q, gates, layer, tables, lens
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
