"""Where the compressed kernel's second sweep spends its time: ablations of `_cmp_kernel`.

    python3 scripts/cmp_sweep2_probe.py [--len 65536] [--split]

The prefill's compressed kernel runs two sweeps over the summaries (docs/kernels_prefill.md). At 64k
on an H100 each costs ≈ 11.6 ms (docs/benchmarks/prefill.md, fiftieth session), though the second
does 60 % of the first's matrix work (q·k̃ again, no p·ṽ). This script times copies of
`nsa_prefill.py` (written beside the package under temporary names, removed afterwards) in which
parts of the second sweep are cut out, so the difference to the next row is what that part costs.
Every row but the last runs both sweeps in one launch with the heads summed per overlap weight
(`cmp_split=0, score_hsum=0`: the library's default until the fifty-first session, which these
ablations were made on):

  one launch              both sweeps, unablated
  no block sums           p's per-page block sums and their moves (`_block_sums`) replaced by one
                          row sum of p (the loop still computes q·k̃ and the exponentials, and
                          stores a [queries, blocks] tile a chunk)
  no block sums, no exp   the same with p = s − m instead of exp2(s − m)
  no second sweep         its loop runs no chunk
  score products          the library's `score_sums=0` config (bf16 products, PrefillConfig knob)
  heads summed first      `score_hsum=1` (the group's heads summed before the overlap weights: one
                          reduction over the heads instead of one per weight)
  library default         both knobs as the library now runs them (heads summed first, the sweeps
                          in two launches)

With --split, each sweep is also timed alone at other tile shapes (`sweep 1 only` is the "no second
sweep" copy; `sweep 2 only` runs no sweep-1 chunk and takes m = 0, l = 1 as its statistics), to see
whether two kernels, each at its own tile shape, would beat the one that runs both.

The ablated copies compute wrong block scores by design: only the compressed kernel's time (torch
profiler, three runs) is read from them, never a result. Needs a CUDA GPU and nsa_kernels importable
(scripts/device_env.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

import torch

from nsa_kernels.bench_prefill import PAPER, make_inputs, profile_kernels

SUMS = "own, spill = _block_sums(p, spill, jr, BT, GP, BJ, E, D, L, P, KSPAN, HSUM)"
ROWSUM = "own = spill + tl.reshape(tl.sum(p, 1), (BT, BJ))  # ablation: no block sums"
EXP = "tl.exp2(s - m_i[:, None])"
NOEXP = "(s - m_i[:, None])"
LOOP = "n_chunks = tl.maximum(tl.cdiv(n_vis, CN), cur_last // BJE + 1)"

ABLATIONS = {
    "no block sums": [(SUMS, ROWSUM, 1)],
    "no block sums, no exp": [(SUMS, ROWSUM, 1), (EXP, NOEXP, 3)],
    "no second sweep": [(LOOP, "n_chunks = 0", 1)],
}
SWEEP2_ONLY = [
    ("for i0 in range(0, n_full, CN):", "for i0 in range(0, 0, CN):", 2),
    ("for i0 in range(n_full, n_vis, CN):", "for i0 in range(n_vis, n_vis, CN):", 2),
    # every kernel's initial statistics (only the compressed kernel is timed)
    ("m_i = tl.full([BM], -1.0e30, tl.float32)", "m_i = tl.zeros([BM], tl.float32)", 3),
    ("l_i = tl.zeros([BM], tl.float32)", "l_i = tl.full([BM], 1.0, tl.float32)", 3),
]
# --split: the tile shapes each sweep is timed at alone (PrefillConfig fields over the one-launch config).
_TILES = [{}, dict(rows_cmp=128, warps_cmp=8), dict(rows_cmp=128, warps_cmp=8, stages_cmp=3), dict(cmp_chunk=128)]
SPLIT = {
    "sweep 1 only": [*_TILES, dict(rows_cmp=32, warps_cmp=4)],
    "sweep 2 only": [kw for t in _TILES for kw in (t, {**t, "score_hsum": 1})] + [dict(rows_cmp=32, warps_cmp=4)],
}


def ablated_module(name, edits):
    """A copy of nsa_prefill with `edits` (text, replacement, expected count) applied."""
    import nsa_kernels
    pkg = os.path.dirname(nsa_kernels.__file__)
    src = open(os.path.join(pkg, "nsa_prefill.py")).read()
    for old, new, count in edits:
        if src.count(old) != count:
            sys.exit(f"{name}: expected {count} of {old!r} in nsa_prefill.py, found {src.count(old)}")
        src = src.replace(old, new)
    modname = "_probe_cmp_" + "".join(c if c.isalnum() else "_" for c in name)
    path = os.path.join(pkg, modname + ".py")
    with open(path, "w") as f:
        f.write(src)
    return importlib.import_module("nsa_kernels." + modname), path


def cmp_ms(mod, q, gates, layer, bt, S, cfg):
    cu = torch.tensor([0, S], dtype=torch.int32, device=q.device)
    sl = torch.tensor([S], dtype=torch.int32, device=q.device)
    G = q.shape[1] // layer.k_cache.shape[1]
    plan = mod.plan_prefill([0, S], [S], page_size=PAPER.select_block, group=G, device=q.device, config=cfg)
    runs = []
    for _ in range(3):
        prof = profile_kernels(lambda: mod.nsa_prefill(q, gates, layer, bt, cu, sl, PAPER, config=cfg, plan=plan))
        runs.append(sum(v for k, v in prof.items() if "_cmp_kernel" in k))
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=65536)
    ap.add_argument("--split", action="store_true", help="also time each sweep alone at other tile shapes")
    args = ap.parse_args()
    S = args.len
    q, gates, layer, bt = make_inputs(S)
    lib = importlib.import_module("nsa_kernels.nsa_prefill")
    lib_cfg = lib.default_config(q.device)
    cfg = dataclasses.replace(lib_cfg, cmp_split=0, score_hsum=0)
    # Before any time: the library's default against the one-launch kernel, at 16k rows of this
    # prompt's end (same selections but near-ties; outputs within bf16 rounding).
    T = min(S, 16384)
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    sl = torch.tensor([S], dtype=torch.int32, device=q.device)
    o0, s0 = lib.nsa_prefill(q[-T:], gates[-T:], layer, bt, cu, sl, PAPER, config=cfg, return_selection=True)
    o1, s1 = lib.nsa_prefill(q[-T:], gates[-T:], layer, bt, cu, sl, PAPER, return_selection=True, config=lib_cfg)
    same = (torch.sort(s0, -1).values == torch.sort(s1, -1).values).all(-1).float().mean().item()
    print(f"library default against the one-launch kernel, last {T} queries: same selected set for {same:.6f} of "
          f"(query, group); max |Δ output| {(o0.float() - o1.float()).abs().max().item():.3e}; "
          f"finite {bool(torch.isfinite(o1).all())}\n")
    rows = []

    def add(label, runs):  # printed as measured too: a call cut short keeps what it timed
        rows.append((label, runs))
        print(f"{label}: {' / '.join(f'{x:.2f}' for x in runs)} ms", flush=True)

    add("one launch", cmp_ms(lib, q, gates, layer, bt, S, cfg))
    for name, edits in ABLATIONS.items():
        mod, path = ablated_module(name, edits)
        try:
            add(name, cmp_ms(mod, q, gates, layer, bt, S, cfg))
        finally:
            os.remove(path)
    add("score products (score_sums=0)", cmp_ms(lib, q, gates, layer, bt, S, dataclasses.replace(cfg, score_sums=0)))
    add("heads summed first (score_hsum=1)",
        cmp_ms(lib, q, gates, layer, bt, S, dataclasses.replace(cfg, score_hsum=1)))
    add("library default", cmp_ms(lib, q, gates, layer, bt, S, lib_cfg))
    if args.split:
        for name, edits in [("sweep 1 only", ABLATIONS["no second sweep"]), ("sweep 2 only", SWEEP2_ONLY)]:
            mod, path = ablated_module(name, edits)
            try:
                for kw in SPLIT[name]:
                    label = f"{name}, {', '.join(f'{k}={v}' for k, v in kw.items()) or 'default tiles'}"
                    try:
                        add(label, cmp_ms(mod, q, gates, layer, bt, S, dataclasses.replace(cfg, **kw)))
                    except Exception as exc:  # a tile shape that does not compile or fit
                        print(f"{label}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            finally:
                os.remove(path)
    print(f"{S} tokens, paper shape, bf16: `_cmp_kernel` ms (profiler, three runs)\n")
    print("| variant | ms |\n|---|---|")
    for name, runs in rows:
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in runs)} |", flush=True)


if __name__ == "__main__":
    main()
