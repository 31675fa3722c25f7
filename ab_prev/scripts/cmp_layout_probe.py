"""Is the decode's compressed pass limited by how its summary reads are laid out in memory?

    python3 scripts/cmp_layout_probe.py [--ctx 65536] [--batch 16 ...]

The compressed pass reads every summary of a sequence through the block table: per kv head, a page
contributes l'/d rows (paper shape: 4 × 384 B of keys, 4 × 256 B of values), so with the cache's
page-major layout [pages, Hkv, E, D] and randomly permuted tables one program reads 1.5 KB / 1 KB
runs scattered over the whole cache. This probe times the same step (same values, same results)
with the summaries placed differently, through strides only — the kernels take any page/head
strides:

  layout  page-major  [pages, Hkv, E, D] (the cache's), or head-major [Hkv, pages, E, D] (a head's
                      summaries of consecutive page ids are contiguous)
  tables  random      a random permutation of the pages (bench_decode's)
          runs of 16  random runs of 16 consecutive page ids (what a paged allocator handing out
                      contiguous extents would give)
          sequential  each sequence's pages in order

With head-major summaries and runs of 16, a head's reads are 24 KB runs. Also times launch variants
of the compressed pass on the cache's layout. Prints the graph time and the compressed pass's
program ends (decode_timeline's stamps, PDL on). Needs a CUDA GPU; nsa_kernels importable
(scripts/device_env.sh). Docs: docs/benchmarks/decode.md, eleventh round.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_timeline import NAMES, instrumented_module, timeline  # noqa: E402


def tables_of(kind: str, B: int, pages_per_seq: int, device) -> torch.Tensor:
    n = B * pages_per_seq
    if kind == "random":
        t = torch.randperm(n, device=device)
    elif kind.startswith("runs"):
        run = int(kind.split()[-1])
        assert n % run == 0
        t = (torch.randperm(n // run, device=device)[:, None] * run + torch.arange(run, device=device)).flatten()
    else:
        t = torch.arange(n, device=device)
    return t.view(B, pages_per_seq).to(torch.int32)


def head_major(x: torch.Tensor) -> torch.Tensor:
    """The same values, stored [Hkv, pages, E, D], seen as [pages, Hkv, E, D]."""
    return x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)


def main(argv=None):
    from nsa_kernels.bench_decode import PAPER_P, SHAPES, make_inputs
    from nsa_kernels.paged import PagedLayerCache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--batch", type=int, action="append")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cmp_layout_probe needs a CUDA GPU")
    mod = instrumented_module()
    tim = torch.zeros(3 * 65536 * 3, dtype=torch.int64, device="cuda")
    print("paper shape, %dk; µs from the first compressed-pass entry: first entry / last entry / last past its "
          "wait / first end / median end / last end" % (args.ctx // 1024))
    variants = [(lay, tab, {}) for lay in ("page-major", "head-major")
                for tab in ("random", "runs 16", "sequential")]
    variants += [("page-major", "random", kw) for kw in
                 (dict(cmp_warps=8), dict(chunk=64, cmp_stages=4), dict(chunk=64, cmp_stages=5),
                  dict(cmp_programs=264, cmp_stages=2))]
    for B in args.batch or (1, 16, 64):
        q, gates, layer, tables, lens = make_inputs(B, args.ctx, **SHAPES["paper"], p=PAPER_P)
        ref = None
        for lay, tab, kw in variants:
            # The same logical cache under every table: pages are renamed, their data moves with them
            # (moved[new[b, j]] = cache[tables[b, j]]).
            new = tables_of(tab, B, tables.shape[1], q.device)
            perm = torch.empty_like(new.flatten())
            perm[new.flatten().long()] = tables.flatten()
            k, v, kc, vc = (t[perm.long()] for t in (layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache))
            if lay == "head-major":
                kc, vc = head_major(kc), head_major(vc)
            moved = PagedLayerCache(k, v, kc, vc)
            step = lambda: mod.nsa_decode_tuned(q, gates, moved, new, lens, PAPER_P, timer=tim, **kw)  # noqa
            out = step().float()
            ref = out if ref is None else ref
            diff = (out - ref).abs().max().item()
            med, us = timeline(step, tim)
            parts = [f"{n} " + "/".join(f"{v:.1f}" for v in med[6 * i:6 * i + 6]) for i, n in enumerate(NAMES)]
            name = f"{lay:10s} {tab:10s} {' '.join(f'{k}={v}' for k, v in kw.items()) or 'default launch'}"
            print(f"B={B:3d} {name:44s} graph {us:6.1f} µs (diff {diff:.1e}) | " + " | ".join(parts), flush=True)
            del moved, k, v, kc, vc
            torch.cuda.empty_cache()
        del q, gates, layer, tables, lens
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
