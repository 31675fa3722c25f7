"""Could cuDNN's attention take the compressed branch's first sweep? A probe for issue 4's plan.

    python3 scripts/cmp_cudnn_probe.py [--len 65536] [--reps 5]

The prefill's compressed kernel (`nsa_prefill._cmp_kernel`, ≈ 23 ms of ≈ 50 at 64k on an H100) runs
two sweeps over the summaries: flash attention (sweep 1) and the block scores (sweep 2, which needs
sweep 1's row max and sum). Triton reaches ≈ 430–480 TFLOP/s on them; torch's cuDNN attention runs
the SDPA baseline at ≈ 600. Sweep 1 is attention with a strided causal mask — query t sees summary
i when i·d + l − 1 ≤ t — and that mask becomes an ordinary causal one per residue of t modulo d:
with t = d·j + r, the last visible summary is j + ⌊(r − l + 1) / d⌋ (j − 2 for r ≤ 14, j − 1 for
r = 15 at the paper's l = 32, d = 16). So the d residues of a one-sequence prompt are d causal
attentions of T/d queries (a strided view of q) against the same summaries, one batched call.

This script measures, on random normal inputs at the paper shape (bf16):
  1. `_cmp_kernel` as the library runs it (both sweeps), and a copy of it with sweep 2 removed
     (`cmp_sweep2_probe`'s module copies, written next to the package under a temporary name, so
     its sweep 1 alone is timed);
  2. the batched residue attention through torch SDPA (cuDNN), q as a strided view and as a
     contiguous copy, with grouped K/V (enable_gqa) where cuDNN takes it;
  3. torch's private cuDNN op with its log-sum-exp (what sweep 2 would need in place of sweep 1's
     max and sum),
and checks the residue attention's outputs and log-sum-exps against float64 on sampled queries of
both residue kinds before any time is printed. Times: medians of CUDA events after a warm-up; the
kernels' from the torch profiler. Needs a CUDA GPU and nsa_kernels importable (scripts/device_env.sh).
Docs: docs/benchmarks/prefill.md (fiftieth session).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from nsa_kernels.bench_prefill import PAPER, make_inputs, timed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cmp_sweep2_probe import ABLATIONS, ablated_module, cmp_ms  # noqa: E402 (the sibling's module copies)


def summaries(layer, bt, n):
    """The first n summaries of the sequence, [Hkv, n, D] for K and V, in order."""
    E = layer.summaries_per_page
    pages = bt[0, : -(-n // E)].long()
    kc = layer.kc_cache[pages].permute(1, 0, 2, 3).reshape(layer.kc_cache.shape[1], -1, layer.kc_cache.shape[-1])
    vc = layer.vc_cache[pages].permute(1, 0, 2, 3).reshape(layer.vc_cache.shape[1], -1, layer.vc_cache.shape[-1])
    return kc[:, :n].contiguous(), vc[:, :n].contiguous()


def residue_views(q, d, lb):
    """Views of a one-sequence prompt's q [S, Hq, Dk] (S a multiple of d) for the compressed
    branch's attention as causal attention per residue of the position modulo d. Query t = d·j + r
    sees summaries i ≤ j + ⌊(r − lb + 1) / d⌋: j − 2 for r < d − 1 and j − 1 for r = d − 1 at the
    paper's lb = 2·d. Returns (q_main [d − 1, Hq, J − 2, Dk]: residues 0 … d − 2 from j = 2, whose
    index a = j − 2 sees summaries ≤ a — top-left causal, batched; q_last [1, Hq, J − 1, Dk]:
    residue d − 1 from j = 1, likewise). Strided views, no copy."""
    S, Hq, Dk = q.shape
    offs = [(r - lb + 1) // d for r in range(d)]
    if S % d or offs != [-2] * (d - 1) + [-1]:
        raise ValueError(f"residue views need S a multiple of d and lb = 2·d (offsets {sorted(set(offs))})")
    qv = q.view(S // d, d, Hq, Dk)
    return qv[2:, : d - 1].permute(1, 2, 0, 3), qv[1:, d - 1].permute(1, 0, 2).unsqueeze(0)


def residue_output(out_main, out_last, d):
    """The residue attentions' outputs back in token order [S, Hq, Dv]; zeros for the queries that
    see no summary (t < lb − 1)."""
    R, Hq, J2, Dv = out_main.shape
    J = J2 + 2
    out = out_main.new_zeros(J, d, Hq, Dv)
    out[2:, : d - 1] = out_main.permute(2, 0, 1, 3)
    out[1:, d - 1] = out_last[0].permute(1, 0, 2)
    return out.reshape(J * d, Hq, Dv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    S, p = args.len, PAPER
    d, lb = p.stride, p.block
    if S % d:
        sys.exit(f"--len must be a multiple of d = {d}")
    q, gates, layer, bt = make_inputs(S)
    T, Hq, Dk = q.shape
    Hkv, Dv = layer.k_cache.shape[1], layer.v_cache.shape[-1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(Dk)
    N = (S - lb) // d + 1  # summaries the last query sees
    kc, vc = summaries(layer, bt, N)  # [Hkv, N, Dk], [Hkv, N, Dv]
    J = S // d  # queries per residue
    q_main, q_last = residue_views(q, d, lb)
    rs, r_last = list(range(d - 1)), d - 1
    k_b, v_b = kc.unsqueeze(0), vc.unsqueeze(0)  # [1, Hkv, N, D]

    def call(qq, gqa=True, contiguous_kv=True):
        B = qq.shape[0]
        if gqa:
            k, v = k_b.expand(B, -1, -1, -1), v_b.expand(B, -1, -1, -1)
        else:
            k = k_b.repeat_interleave(G, 1).expand(B, -1, -1, -1)
            v = v_b.repeat_interleave(G, 1).expand(B, -1, -1, -1)
        if contiguous_kv:
            k, v = k.contiguous(), v.contiguous()
        return lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=scale, enable_gqa=gqa)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    variants = [("cuDNN, q strided, grouped K/V", q_main, True), ("cuDNN, q contiguous, grouped K/V",
                                                                  q_main.contiguous(), True),
                ("cuDNN, q contiguous, K/V expanded to 64 heads", q_main.contiguous(), False)]
    ok_fn = None
    for name, qq, gqa in variants:
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                fn = call(qq, gqa)
                out = fn()
                ms = timed(fn, args.reps)
            results.append((name, ms, tuple(out.shape)))
            ok_fn = ok_fn or (fn, qq, gqa)
        except Exception as e:  # a layout cuDNN refuses is reported, not fatal
            results.append((name, None, f"{type(e).__name__}: {str(e)[:100]}"))
    if ok_fn is None:
        for r in results:
            print(r)
        sys.exit("cuDNN took none of the layouts")

    # Check the residue mapping and cuDNN's numbers against float64 on sampled queries.
    fn, qq, gqa = ok_fn
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out_main = fn()
        out_last = call(q_last, gqa)()
    # torch's private cuDNN op also returns the log-sum-exp: first with the grouped K/V as they are
    # (4 heads for 64 query heads), then expanded to every query head.
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    lse, lse_note = None, "private op refused every layout"
    for how, qq in (("grouped", q_main), ("grouped", q_main.contiguous()), ("expanded", q_main.contiguous())):
        qs = "strided" if qq is q_main else "contiguous"
        try:
            if how == "grouped":
                kx, vx = (t.expand(d - 1, -1, -1, -1).contiguous() for t in (k_b, v_b))
            else:
                kx, vx = (t.repeat_interleave(G, 1).expand(d - 1, -1, -1, -1).contiguous() for t in (k_b, v_b))
            lse_fn = lambda: op(qq, kx, vx, None, True, 0.0, True, False, scale=scale)  # noqa: E731
            res = lse_fn()
            lse = res[1]
            if (res[0].float() - out_main.float()).abs().max().item() > 1e-2:
                raise ValueError("its output differs from SDPA's")
            results.append((f"private cuDNN op with log-sum-exp, q {qs}, {how} K/V", timed(lse_fn, args.reps), ""))
            lse_note = f"log-sum-exp {tuple(lse.shape)} {lse.dtype} (q {qs}, {how} K/V)"
            break
        except Exception as e:
            lse = None
            results.append((f"private cuDNN op with log-sum-exp, q {qs}, {how} K/V", None,
                            f"{type(e).__name__}: {str(e)[:100]}"))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        results.append(("cuDNN, the last residue alone (1 × 4095 queries)", timed(call(q_last, gqa), args.reps), ""))
    gen = torch.Generator().manual_seed(0)
    worst, worst_lse = 0.0, 0.0
    picks = [(int(torch.randint(2, J, (1,), generator=gen)), rs[int(torch.randint(0, d - 1, (1,), generator=gen))])
             for _ in range(12)] + [(2, rs[0]), (J - 1, rs[-1]), (1, r_last), (J - 1, r_last)]
    for j, r in picks:
        t = d * j + r
        last = (t - lb + 1) // d  # last visible summary
        h = int(torch.randint(0, Hq, (1,), generator=gen))
        kh = h // G
        s = (q[t, h].double() @ kc[kh, : last + 1].double().T) * scale
        ref = torch.softmax(s, 0) @ vc[kh, : last + 1].double()
        if r == r_last:
            got = out_last[0, h, j - 1].double()
        else:
            got = out_main[rs.index(r), h, j - 2].double()
            if lse is not None:
                worst_lse = max(worst_lse, abs(float(lse[rs.index(r), h, j - 2].reshape(-1)[0]) - float(torch.logsumexp(s, 0))))
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    print(f"residue mapping checked on {len(picks)} queries: max error {worst:.2e} of each output's largest "
          f"value (bf16); {lse_note}" + (f", max |Δ lse| {worst_lse:.2e}" if lse is not None else ""))
    if worst > 2e-2:
        sys.exit("the residue attention does not match float64: no times printed")

    # The library's compressed kernel, both sweeps and sweep 1 alone (cmp_sweep2_probe's copy of
    # the module without the second sweep), at the same prompt.
    lib = importlib.import_module("nsa_kernels.nsa_prefill")
    cmp_both = cmp_ms(lib, q, gates, layer, bt, S, lib.default_config(q.device))
    mod1, path = ablated_module("no second sweep", ABLATIONS["no second sweep"])
    try:
        cmp_one = cmp_ms(mod1, q, gates, layer, bt, S, mod1.default_config(q.device))
    finally:
        os.remove(path)
    t_all = torch.arange(S, dtype=torch.float64)
    seen = torch.clamp(torch.floor((t_all - lb + 1) / d) + 1, 0, N)  # summaries query t sees
    flop1 = 2.0 * Hq * (Dk + Dv) * float(seen.sum())
    flop_main = 2.0 * Hq * (Dk + Dv) * (d - 1) * (J - 2) * (J - 1) / 2  # the batched call's part
    print(f"\n{S} tokens, paper shape, bf16; sweep 1 is {flop1 / 1e12:.2f} TFLOP\n")
    print("| what | ms | TFLOP/s of sweep 1's work |\n|---|---|---|")
    print(f"| `_cmp_kernel`, both sweeps (profiler, 3 runs) | {' / '.join(f'{x:.2f}' for x in cmp_both)} | |")
    print(f"| `_cmp_kernel`, sweep 1 only | {' / '.join(f'{x:.2f}' for x in cmp_one)} | "
          f"{flop1 / (statistics.median(cmp_one) * 1e-3) / 1e12:.0f} |")
    for name, ms, info in results:
        if ms is None:
            print(f"| {name} | refused: {info} | |")
        elif "last residue" in name:
            print(f"| {name} | {ms:.2f} | |")
        else:
            print(f"| {name}, {d - 1} residues of {J - 2} queries | {ms:.2f} | "
                  f"{flop_main / (ms * 1e-3) / 1e12:.0f} |")
    qc = timed(lambda: q_main.contiguous(), args.reps)
    print(f"| copy of q into residue order (what a contiguous layout costs) | {qc:.2f} | |")


if __name__ == "__main__":
    main()
