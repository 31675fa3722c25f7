"""How fast can anything read the prefill's selected pages? The ceiling under `_slc_kernel`.

    python3 scripts/slc_read_probe.py        # on a GPU, from the repo root (kernels/ importable
                                             # as nsa_kernels: source scripts/device_env.sh)

Why: at 64k the selected branch (`_slc_kernel`, ≈ 20 ms on an H100) reads each query's 13
non-forced pages per kv group — ≈ 140 GB, one group's 42 MB of pages at a time, so from the L2 —
and Nsight Compute put it at 72 % of the L2's throughput (docs/benchmarks/prefill.md). Issue 4's
plan treats that as the branch's floor. This probe measures the floor directly, with the same
access pattern and grid and none of the kernel's other work: one program per (query row, kv
group), rows fastest, 13 pseudo-random pages among the row's causal blocks, each page's K
(64 × 192) and V (64 × 128) bf16 read through a shuffled block table from a [pages, Hkv, 64, D]
cache. Modes, per page:
  read  — the tiles summed (no matrix unit; the fewest registers, so the most programs an SM);
  dot   — q·kᵀ and p·v for the group's 16 heads (p = the scores cast to bf16; no softmax);
  soft  — the same with the online softmax, i.e. the kernel's loop without its top-n, forced-block
          merge and output.
Times are medians of CUDA-event timings after a warm-up, on random normal data (never zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_kernels.nsa_prefill import _mm  # a @ b in fp32; the interpreter's bf16 dots upcast

P, DK1, DK2, DV, HKV, G = 64, 128, 64, 128, 4, 16


@triton.jit
def _pages(q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, sk_p, sk_h, sv_p, sv_h,
           NSEL: tl.constexpr, MODE: tl.constexpr, P: tl.constexpr, DK1: tl.constexpr,
           DK2: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, HG: tl.constexpr,
           PREC: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    nb = r // P + 1  # blocks visible to a query at position r
    kr = tl.arange(0, P)
    d1 = tl.arange(0, DK1)
    d2 = DK1 + tl.arange(0, DK2)
    dv = tl.arange(0, DV)
    g = tl.arange(0, G)
    q_off = (r.to(tl.int64) * HG + h * G + g) * (DK1 + DK2)
    q1 = tl.load(q_ptr + q_off[:, None] + d1[None, :])
    q2 = tl.load(q_ptr + q_off[:, None] + d2[None, :])
    acc = tl.zeros([G, DV], tl.float32)
    m_i = tl.full([G], -1.0e30, tl.float32)
    l_i = tl.zeros([G], tl.float32)
    for s in range(NSEL):
        blk = ((r.to(tl.int64) * 2654435761 + s * 40503 + h * 7919) >> 7) % nb
        pg = tl.load(bt_ptr + blk).to(tl.int64)
        kb = k_ptr + pg * sk_p + h * sk_h + kr * (DK1 + DK2)
        vb = v_ptr + pg * sv_p + h * sv_h + kr * DV
        if MODE == 0:
            k1 = tl.load(kb[:, None] + d1[None, :]).to(tl.float32)
            k2 = tl.load(kb[:, None] + d2[None, :]).to(tl.float32)
            v = tl.load(vb[:, None] + dv[None, :]).to(tl.float32)
            acc += (tl.sum(k1, 0)[None, :] + tl.sum(v, 0)[None, :]) + tl.sum(tl.sum(k2, 1), 0)
        else:
            k1 = tl.load(kb[None, :] + d1[:, None])
            k2 = tl.load(kb[None, :] + d2[:, None])
            sc = _mm(q1, k1, PREC, UPCAST) + _mm(q2, k2, PREC, UPCAST)
            v = tl.load(vb[:, None] + dv[None, :])
            if MODE == 1:
                acc += _mm(sc.to(v.dtype), v, PREC, UPCAST)
            else:
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
                m_i = m_new
    if MODE == 2:
        acc = acc / l_i[:, None]
    o_off = (r.to(tl.int64) * HG + h * G + g) * DV
    tl.store(out_ptr + o_off[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty))



def main():
    torch.manual_seed(0)
    rows = 65536
    n_pages = rows // P
    k = torch.randn(n_pages, HKV, P, DK1 + DK2, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n_pages, HKV, P, DV, device="cuda", dtype=torch.bfloat16)
    bt = torch.randperm(n_pages, device="cuda").to(torch.int32)
    q = (torch.randn(rows, HKV * G, DK1 + DK2, device="cuda") * 0.07).to(torch.bfloat16)
    out = torch.empty(rows, HKV * G, DV, device="cuda", dtype=torch.bfloat16)
    nsel = 13
    page_bytes = P * (DK1 + DK2 + DV) * 2
    gb = rows * HKV * nsel * page_bytes / 1e9
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"64k rows × {HKV} kv groups × {nsel} pages × {page_bytes // 1024} KB = {gb:.1f} GB of page reads a launch")
    print("| mode | warps | stages | ms (median) | TB/s | registers | programs an SM (estimated) |")
    print("|---|---|---|---|---|---|---|")
    for mode, name in ((0, "read"), (1, "dot"), (2, "soft")):
        for warps in (2, 4):
            for stages in (1, 2, 3):
                def fn():
                    return _pages[(rows, HKV)](q, k, v, bt, out, k.stride(0), k.stride(1), v.stride(0),
                                               v.stride(1), NSEL=nsel, MODE=mode, P=P, DK1=DK1, DK2=DK2,
                                               DV=DV, G=G, HG=HKV * G, PREC="tf32", UPCAST=False, num_warps=warps,
                                               num_stages=stages)
                try:
                    kern = fn()
                except Exception as e:  # noqa: BLE001 (a shape that does not build is a row, not an end)
                    print(f"| {name} | {warps} | {stages} | failed: {type(e).__name__} | | | |")
                    continue
                for _ in range(3):
                    fn()
                times = []
                for _ in range(7):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                ms = sorted(times)[len(times) // 2]
                regs = getattr(kern, "n_regs", "?")
                smem = getattr(kern, "metadata", None)
                smem = getattr(smem, "shared", 0) if smem is not None else 0
                occ = "?"
                if isinstance(regs, int) and regs > 0:
                    occ = min(65536 // (regs * 32 * warps), 228 * 1024 // max(smem + 1024, 1), 64 // warps)
                print(f"| {name} | {warps} | {stages} | {ms:.2f} | {gb / ms:.2f} | {regs} | {occ} |", flush=True)


if __name__ == "__main__":
    main()
