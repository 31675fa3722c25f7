"""Does this Triton warp-specialise a flash-attention loop for Hopper? A compile-only probe (no GPU).

    python3 scripts/hopper_ws_probe.py          # with the Triton installed here (the device has 3.6)
    python3 scripts/hopper_ws_probe.py --time   # on a Hopper GPU: also time the attention loop

Why: the prefill compressed kernel (`nsa_prefill._cmp_kernel`, two summary sweeps) is the largest
part of a 64k prefill, and FlashAttention-3's gain over it comes from warp specialisation (a
producer warp group issuing the TMA copies while consumer warp groups compute). Triton 3.6 has a
Hopper pass for it (`nvgpu-warp-specialization`), asked for per loop with
`tl.range(..., warp_specialize=True)`. This script compiles, for sm_90, small kernels shaped like
the compressed sweeps and reports, for each, whether the pass produced a `ttg.warp_specialize`
region, its shared memory, or the compiler's error:

- `matmul`: one loop of two TMA tile loads and a dot (the pass's basic case);
- `attention, q by pointer`: one online-softmax loop over TMA-loaded K/V tiles, q loaded through
  pointers before the loop;
- `attention, q by TMA`: the same with q through a tensor descriptor too;
- `attention, two loops`: the sweep split in two loops (unmasked, then masked), as `_cmp_kernel`
  splits its sweep 1.

With --time (a Hopper GPU) the single-loop attention kernel with q by TMA, the one case the pass
takes, is also run with and without warp specialisation at the compressed sweep's scale (4096
keys, 64-row tiles of 16 heads × 4 queries, d = 128, 16384 programs): medians of
`triton.testing.do_bench`, random normal bf16, outputs compared.

Results with Triton 3.6.0 are in docs/benchmarks/prefill.md (seventeenth session).
"""

from __future__ import annotations

import argparse

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _matmul(a_desc, b_desc, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
        acc = tl.dot(a_desc.load([pid * BM, k]), b_desc.load([k, 0]), acc)
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    tl.store(c_ptr + (pid * BM + r)[:, None] * BN + c[None, :], acc)


@triton.jit
def _attn_step(q, k_desc, v_desc, i, m, l, o, rows, BN: tl.constexpr, MASK: tl.constexpr):
    s = tl.dot(q, tl.trans(k_desc.load([i, 0])))
    if MASK:
        s = tl.where((i + tl.arange(0, BN))[None, :] <= rows[:, None], s, float("-inf"))
    mn = tl.maximum(m, tl.max(s, 1))
    a = tl.exp2(m - mn)
    p = tl.exp2(s - mn[:, None])
    o = o * a[:, None] + tl.dot(p.to(tl.bfloat16), v_desc.load([i, 0]))
    return mn, l * a + tl.sum(p, 1), o


@triton.jit
def _attention(q_ptr, q_desc, k_desc, v_desc, o_ptr, N, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
               WS: tl.constexpr, Q_TMA: tl.constexpr, TWO_LOOPS: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BM)
    d = tl.arange(0, D)
    rows = pid * BM + r
    if Q_TMA:
        q = q_desc.load([pid * BM, 0])
    else:
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :])
    m = tl.full([BM], -1e30, tl.float32)
    l = tl.zeros([BM], tl.float32)
    o = tl.zeros([BM, D], tl.float32)
    if TWO_LOOPS:
        for i in tl.range(0, N // 2, BN, warp_specialize=WS):
            m, l, o = _attn_step(q, k_desc, v_desc, i, m, l, o, rows, BN, False)
        for i in tl.range(N // 2, N, BN, warp_specialize=WS):
            m, l, o = _attn_step(q, k_desc, v_desc, i, m, l, o, rows, BN, True)
    else:
        for i in tl.range(0, N, BN, warp_specialize=WS):
            m, l, o = _attn_step(q, k_desc, v_desc, i, m, l, o, rows, BN, True)
    tl.store(o_ptr + rows[:, None] * D + d[None, :], o / l[:, None])


def _compile(fn, signature, constexprs, num_warps=4, num_stages=2):
    """'engaged' / 'not engaged' with the shared memory, or the compiler's error (first line)."""
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # the pass's failures surface as a failed pass pipeline
        return f"compile error: {str(e).splitlines()[0][:100]}"
    engaged = "ttg.warp_specialize" in k.asm["ttgir"]
    return f"{'engaged' if engaged else 'not engaged'}, {k.metadata.shared} B shared"


def main():
    print(f"Triton {triton.__version__}, sm_90, 4 warps")
    mm_sig = {"a_desc": "tensordesc<bf16[128,64]>", "b_desc": "tensordesc<bf16[64,128]>", "c_ptr": "*fp32",
              "K": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
    at_sig = {"q_ptr": "*bf16", "q_desc": "tensordesc<bf16[64,128]>", "k_desc": "tensordesc<bf16[64,128]>",
              "v_desc": "tensordesc<bf16[64,128]>", "o_ptr": "*fp32", "N": "i32", "BM": "constexpr",
              "BN": "constexpr", "D": "constexpr", "WS": "constexpr", "Q_TMA": "constexpr",
              "TWO_LOOPS": "constexpr"}
    cases = [("matmul", _matmul, mm_sig, dict(BM=128, BN=128, BK=64), 3)]
    for name, q_tma, two in [("attention, q by pointer", False, False), ("attention, q by TMA", True, False),
                             ("attention, two loops", True, True)]:
        cases.append((name, _attention, at_sig, dict(BM=64, BN=64, D=128, Q_TMA=q_tma, TWO_LOOPS=two), 2))
    print("| kernel | without warp_specialize | with warp_specialize |\n|---|---|---|")
    for name, fn, sig, cx, stages in cases:
        res = [_compile(fn, sig, {**cx, "WS": ws}, num_stages=stages) for ws in (False, True)]
        print(f"| {name} | {res[0]} | {res[1]} |", flush=True)


def time_attention(n_keys=4096, programs=16384, BM=64, BN=64, D=128):
    """µs and TFLOP/s (two products) of the single-loop attention, q by TMA, without / with WS."""
    import torch
    from triton.testing import do_bench
    from triton.tools.tensor_descriptor import TensorDescriptor

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(programs * BM, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(n_keys, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(n_keys, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    qd = TensorDescriptor.from_tensor(q, [BM, D])
    kd = TensorDescriptor.from_tensor(k, [BN, D])
    vd = TensorDescriptor.from_tensor(v, [BN, D])
    flop = 4 * programs * BM * n_keys * D
    outs = []
    print("| attention loop, q by TMA | µs | TFLOP/s |\n|---|---|---|")
    for ws in (False, True):
        o = torch.empty(programs * BM, D, device="cuda", dtype=torch.float32)
        run = lambda: _attention[(programs,)](q, qd, kd, vd, o, n_keys, BM=BM, BN=BN, D=D, WS=ws,  # noqa: E731
                                             Q_TMA=True, TWO_LOOPS=False, num_warps=4, num_stages=2)
        run()
        us = do_bench(run) * 1e3
        outs.append(o)
        print(f"| warp_specialize={ws} | {us:.0f} | {flop / us / 1e6:.0f} |", flush=True)
    print("max |difference| of the outputs:", (outs[0] - outs[1]).abs().max().item())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true", help="also time the attention loop (Hopper GPU)")
    args = ap.parse_args()
    main()
    if args.time:
        time_attention()
