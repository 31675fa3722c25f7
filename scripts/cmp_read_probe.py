"""How fast can the decode compressed pass's loads go, without its math? A diagnostic for issue 3.

    python3 scripts/cmp_read_probe.py [--ctx 65536] [--batch 16 --batch 64] [--flush read]

The compressed pass (`nsa_decode._cmp_tile_kernel`) streams every visible summary once; at 64k,
batch 16 it reaches ~3 TB/s, at batch 64 ~3.5. Smaller tiles, deeper pipelines, more warps and
warpgroup MMA all measured slower or equal (docs/benchmarks/decode.md, fifteenth round), which
points at the reads themselves. This script times kernels that only read and sum the same bytes:

- `per-head`: the pass's own access pattern. A program per (sequence, kv head, split) reads
  128-entry tiles through the block table: per page one 4 × 384 B run of K and 4 × 256 B of V,
  the kv heads' runs of the same page read by four different programs.
- `all-heads`: a program per (sequence, split) reads every kv head of 32-entry tiles: per page one
  contiguous 6 KB run of K and 4 KB of V (the cache's [page, head, entry, d] layout), same bytes
  per tile. (`scripts/cmp_layout_probe.py` asks the layout question with the real kernel.)
- `contiguous`: torch's sum over a tensor of the same size (a plain streaming read).

Medians of `bench_decode.bench` (L2 emptied before each call, by writes or by reads: --flush),
random normal data, random page tables. Needs a CUDA GPU; nsa_kernels importable (scripts/device_env.sh).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _per_head(kc, vc, bt, out, sbt, skp, skh, ske, svp, svh, sve, n_ent, Hkv, NSPLIT,
              DK0: tl.constexpr, DK1: tl.constexpr, DV: tl.constexpr, E: tl.constexpr, BN: tl.constexpr,
              STAGES: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    n_tiles = tl.cdiv(n_ent, BN)
    tps = tl.cdiv(n_tiles, NSPLIT)
    t_lo = split * tps
    t_hi = tl.minimum(t_lo + tps, n_tiles)
    d0 = tl.arange(0, DK0)
    d1 = DK0 + tl.arange(0, DK1)
    dv = tl.arange(0, DV)
    acc = tl.zeros([BN], tl.float32)
    i_n = t_lo * BN + tl.arange(0, BN)
    page_n = tl.load(bt + b * sbt + i_n // E, mask=i_n < n_ent, other=0)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        i = t * BN + tl.arange(0, BN)
        page = page_n.to(tl.int64)
        page_n = tl.load(bt + b * sbt + (i + BN) // E, mask=i + BN < n_ent, other=0)
        base = kc + page * skp + kh * skh + (i % E) * ske
        k0 = tl.load(base[:, None] + d0[None, :])
        k1 = tl.load(base[:, None] + d1[None, :])
        v = tl.load(vc + page[:, None] * svp + kh * svh + (i % E)[:, None] * sve + dv[None, :])
        acc += tl.sum(k0.to(tl.float32), 1) + tl.sum(k1.to(tl.float32), 1) + tl.sum(v.to(tl.float32), 1)
    tl.store(out + (pid * NSPLIT + split) * BN + tl.arange(0, BN), acc)


@triton.jit
def _all_heads(kc, vc, bt, out, sbt, skp, ske, svp, sve, n_ent, NSPLIT,
               DK0: tl.constexpr, DK1: tl.constexpr, DV: tl.constexpr, HE: tl.constexpr, PPT: tl.constexpr,
               E: tl.constexpr, STAGES: tl.constexpr):
    """Tiles of PPT pages × HE (= Hkv·E) rows: each page's rows are one contiguous run."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    ROWS: tl.constexpr = PPT * HE
    n_pages = tl.cdiv(n_ent, E)
    n_tiles = tl.cdiv(n_pages, PPT)
    tps = tl.cdiv(n_tiles, NSPLIT)
    t_lo = split * tps
    t_hi = tl.minimum(t_lo + tps, n_tiles)
    r = tl.arange(0, ROWS)
    d0 = tl.arange(0, DK0)
    d1 = DK0 + tl.arange(0, DK1)
    dv = tl.arange(0, DV)
    acc = tl.zeros([ROWS], tl.float32)
    j_n = t_lo * PPT + r // HE
    page_n = tl.load(bt + b * sbt + j_n, mask=j_n < n_pages, other=0)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        j = t * PPT + r // HE
        page = page_n.to(tl.int64)
        page_n = tl.load(bt + b * sbt + j + PPT, mask=j + PPT < n_pages, other=0)
        base = kc + page * skp + (r % HE) * ske
        k0 = tl.load(base[:, None] + d0[None, :])
        k1 = tl.load(base[:, None] + d1[None, :])
        v = tl.load(vc + page[:, None] * svp + (r % HE)[:, None] * sve + dv[None, :])
        acc += tl.sum(k0.to(tl.float32), 1) + tl.sum(k1.to(tl.float32), 1) + tl.sum(v.to(tl.float32), 1)
    tl.store(out + (b * NSPLIT + split) * ROWS + r, acc)


def main(argv=None):
    from nsa_kernels import bench_decode
    from nsa_kernels._triton_utils import num_sms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--flush", choices=bench_decode.FLUSH_MODES, default="write",
                    help="how the L2 is emptied before each timed call (bench_decode.FLUSH)")
    args = ap.parse_args(argv)
    bench_decode.FLUSH = args.flush
    Hkv, E, P, Dk, Dv = 4, 4, 64, 192, 128
    sms = num_sms(torch.cuda.current_device())
    print(f"L2 flush: {args.flush}\n| batch | reader | programs | µs | TB/s |\n|---|---|---|---|---|")
    for B in args.batch or (16, 64):
        torch.manual_seed(0)
        pages = args.ctx // P
        kc = torch.randn(B * pages, Hkv, E, Dk, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B * pages, Hkv, E, Dv, device="cuda", dtype=torch.bfloat16)
        bt = torch.randperm(B * pages, device="cuda").view(B, pages).to(torch.int32)
        n_ent = pages * E
        nbytes = kc.numel() * 2 + vc.numel() * 2
        runs = {}

        def per_head(nsplit, warps, stages, BN=128):
            out = torch.empty(B * Hkv * nsplit * BN, device="cuda")
            return lambda: _per_head[(B * Hkv, nsplit)](
                kc, vc, bt, out, bt.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0),
                vc.stride(1), vc.stride(2), n_ent, Hkv, nsplit, DK0=128, DK1=64, DV=Dv, E=E, BN=BN,
                STAGES=stages, num_warps=warps)

        def all_heads(nsplit, warps, stages, rows=128):
            out = torch.empty(B * nsplit * rows, device="cuda")
            return lambda: _all_heads[(B, nsplit)](
                kc, vc, bt, out, bt.stride(0), kc.stride(0), kc.stride(2), vc.stride(0), vc.stride(2), n_ent,
                nsplit, DK0=128, DK1=64, DV=Dv, HE=Hkv * E, PPT=rows // (Hkv * E), E=E, STAGES=stages,
                num_warps=warps)

        for warps in (4, 8):
            for stages in (2, 3):
                n = max(1, min(n_ent // 128, sms // (B * Hkv)))  # as the pass: one program an SM
                runs[f"per-head, {warps} warps, {stages} stages"] = (B * Hkv * n, per_head(n, warps, stages))
                n = max(1, min(pages // (128 // (Hkv * E)), sms // B))
                runs[f"all-heads, {warps} warps, {stages} stages"] = (B * n, all_heads(n, warps, stages))
        flat_k, flat_v = kc.view(-1), vc.view(-1)
        runs["contiguous (torch sum)"] = (0, lambda: (flat_k.sum(), flat_v.sum()))
        for name, (progs, fn) in runs.items():
            fn()
            us = bench_decode.bench(fn)
            print(f"| {B} | {name} | {progs or '—'} | {us:.1f} | {nbytes / (us * 1e-6) / 1e12:.2f} |", flush=True)
        kc = vc = bt = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
