"""φ for a decode step: each row's completed compression block, from the cache to its summary slot.

In a decode step every sequence may complete one compression block of l tokens per kv head. φ
(mlp / linear) maps the block's K and V to one summary each. The eager form was five launches a
layer: gather the blocks (`gather_block_pair`), a batched GEMM with the folded bias, SiLU, a second
batched GEMM, and the summary write. Its first GEMM is [2, rows, l·Dm] × [2, l·Dm, Dm]: 4.7 MB of
weights at the paper shape, which cuBLAS runs on a handful of thread blocks (`N = Dm = 192`), ~11 µs
a layer on the H200 at 8 sequences (docs/benchmarks/engine.md), and all five ran in every step
although a sequence completes a block only every d tokens. Here it is two launches, and neither
reads the weights in a step where no row writes a summary (rows pointing at `skip_page`, a decode
graph's trash page, write none):

1. `_phi_partial_kernel`, grid (token split, K-or-V, output-column tile × row tile): reads its rows' block
   tokens straight from the paged cache (the gather) and multiplies them by its slice of the first
   weight, writing float32 partial sums. Splitting the l-token reduction is what puts the weight
   read on enough SMs.
2. `_phi_finish_kernel`, grid (row tile, K-or-V, output-column tile): sums the partials in a fixed
   order (deterministic, no atomics), adds the bias, then for the MLP form applies SiLU and the
   second [Dm, Dm] product, and writes the summary into its slot (slot −1: no write).

H200, paper-1b, a step where every row writes (scripts/phi_decode_bench.py, 2026-12-04): 12.4–12.5
/ 15.3–15.5 / 15.9–16.0 / 16.8–17.0 / 26.6–27.3 µs a layer at 1 / 16 / 32 / 64 / 128 sequences,
against the five launches' 22.8–29.2; 2.4–3.7 µs in a step where no row writes. The first version
took 27–33 µs at 1–16 sequences: its partial kernel loaded a slot and then the row it names in every
iteration, and its finish's partial sum replicated SiLU and the second product across threads (the
kernels' docstrings say how each was found). Until row tiles had programs of their own, 64
sequences took 30.1. The engine uses this up to `nsa_serve.engine.decode_graphs.FUSED_PHI_MAX_BATCH`
sequences.

The layout is `NSAAttention.fuse_phi`'s: each token's row zero-padded to Dm = max(Dk, Dv), weights
W1 [2, l·Dm, Dm], bias [2, 1, Dm], W2 [2, Dm, Dm] or None (φ = linear). The twin is
`phi_write_pair_reference` (the gather, `phi_pair`'s products and the write in PyTorch ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import check_last_dim_contiguous, dot_precision, interpreter_upcast
from .paged import gather_block_pair_reference

# The first product's l-token reduction in SPLITS pieces. With one 64-row tile a partial program
# (`row_tiles` = 1), 4 splits are the fastest at every batch measured. H200, paper-1b, µs a layer
# with every row writing, one call, 4 / 8 / 16 splits: 12.4 / 14.2 / 15.5 at 1 sequence, 15.4 /
# 16.0 / 16.8 at 16, 15.9 / 16.4 / 20.6 at 32, 17.0 / 23.7 / 27.0 at 64, 27.3 / 32.7 / 48.2 at 128
# (the gather path: 22.8–29.2). Before row tiles had their own programs, 64 sequences needed 16
# splits to fill the GPU and took 30.1.
SPLITS = 4
MAX_SPLITS = 16


@triton.jit
def _writes(eslots_ptr, n, ok, E: tl.constexpr, SKIP_PAGE):
    """Whether row n's summary is written: its entry slot is set and not on the skip page."""
    e = tl.load(eslots_ptr + n, mask=ok, other=-1).to(tl.int64)
    return ok & (e >= 0) & (e // E != SKIP_PAGE), e


@triton.jit
def _phi_partial_kernel(part_ptr, sp_s, sp_w, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                        slots_ptr, eslots_ptr, SKIP_PAGE, w_ptr, sw_w, N, NR, TPS, RPP,
                        H: tl.constexpr, R: tl.constexpr, E: tl.constexpr, LB: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, DM: tl.constexpr, BK: tl.constexpr,
                        BN: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr,
                        STAGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (s, w, c + CT·r): Σ over tokens [s·TPS, (s+1)·TPS) of the block of x[rows, token] ·
    W1[w, token's rows, c-tile], for the RPP row tiles of BR rows from r·RPP (CT = DM // BN column
    tiles). One row tile a program by default: with all of them in one program, 64 sequences'
    256 rows were four tiles one after the other on only 96 programs (30.1 µs a layer against the
    gather path's 25.7).

    The loop runs over tokens and reads the *next* token's slots (a loop-carried vector). The
    first version looped over 64-column chunks and loaded each chunk's slot and then the row it
    names: two dependent round trips an iteration. A second read the split's slots before the
    loop and picked each token's with a masked sum; the compiler then knew nothing of the rows'
    alignment and made 2-byte loads of them (Nsight Compute: `LDG.E.U16`, the most-stalled
    instructions). Here a row's address is page·stride + row·stride with the strides as
    arguments, so the loads are 16-byte copies the pipeline issues ahead. A token's chunks past
    K's or V's own width (V's padding to Dm) read nothing: their weight rows multiply zeros."""
    s = tl.program_id(0)
    w = tl.program_id(1)
    every = tl.arange(0, NP)
    any_row, _any_e = _writes(eslots_ptr, every, every < N, E, SKIP_PAGE)
    if tl.max(any_row.to(tl.int32), 0) > 0:
        CT: tl.constexpr = DM // BN
        cols = (tl.program_id(2) % CT) * BN + tl.arange(0, BN)
        r_first = (tl.program_id(2) // CT) * RPP * BR
        r_end = tl.minimum(NR, r_first + RPP * BR)
        kk = tl.arange(0, BK)
        is_k = w == 0
        d_w = tl.where(is_k, DK, DV)
        t0 = s * TPS
        t1 = tl.minimum(t0 + TPS, LB)
        w_base = w_ptr + w * sw_w + cols[None, :]
        for r0 in range(r_first, r_end, BR):
            rows = r0 + tl.arange(0, BR)
            r_ok = rows < r_end
            n, h = rows // H, rows % H
            live, _live_e = _writes(eslots_ptr, n, r_ok, E, SKIP_PAGE)  # other rows' blocks are not read
            head_k, head_v = h * sk_h, h * sv_h
            sl = tl.load(slots_ptr + n * LB + t0, mask=live, other=-1).to(tl.int64)
            acc = tl.zeros((BR, BN), tl.float32)
            for t in tl.range(t0, t1, num_stages=STAGES):
                # (n * 0 makes the bound a vector: the CPU interpreter refuses a scalar mask term)
                nxt = tl.load(slots_ptr + n * LB + t + 1, mask=live & (n * 0 + t + 1 < t1), other=-1).to(tl.int64)
                page, rr = sl // R, sl % R
                row_k = page * sk_p + head_k + rr * sk_r
                row_v = page * sv_p + head_v + rr * sv_r
                for q in tl.static_range(DM // BK):
                    j = q * BK + kk
                    ok = (sl >= 0)[:, None] & (j < d_w)[None, :]
                    src = tl.where(is_k, k_ptr + row_k[:, None] + j[None, :], v_ptr + row_v[:, None] + j[None, :])
                    x = tl.load(src, mask=ok, other=0.0)
                    wt = tl.load(w_base + (t * DM + j)[:, None] * DM, mask=(j < d_w)[:, None], other=0.0)
                    if UPCAST:  # the CPU interpreter's dot multiplies bf16's raw bits
                        x = x.to(tl.float32)
                        wt = wt.to(tl.float32)
                    acc = tl.dot(x, wt, acc, input_precision=PREC)
                sl = nxt
            tl.store(part_ptr + s * sp_s + w * sp_w + rows[:, None] * DM + cols[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _phi_finish_kernel(part_ptr, sp_s, sp_w, N, NR, b_ptr, w2_ptr, sw2_w,
                       kc_ptr, skc_p, skc_h, skc_r, vc_ptr, svc_p, svc_h, svc_r, eslots_ptr, SKIP_PAGE,
                       KS: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, DM: tl.constexpr, BN: tl.constexpr,
                       BR: tl.constexpr, MLP: tl.constexpr, FSTAGES: tl.constexpr, PREC: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Program (r, w, c): summary columns c-tile of rows r-tile for K (w = 0) or V (w = 1). The KS
    partials of a [BR, BN] tile are KS two-dimensional reads, unrolled so they are in flight
    together. (The first version read them as one [KS, BR, BN] tile and summed over its first
    axis: the sum's result was replicated across the threads that held different partials, and
    SiLU and everything after ran once per partial, 8 times over: 29 µs for 6 programs under
    Nsight Compute.) The hidden row's chunks are a rolled loop (the kernel runs once per program,
    so its code is fetched once too) pipelined FSTAGES deep: with as many stages as chunks, every
    chunk's reads are issued before the first chunk's math (2.3 µs less than unpipelined at one
    sequence). A tile with no row to write reads nothing."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    w = tl.program_id(1)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    r_ok = rows < NR
    n, h = rows // H, rows % H
    live, slot = _writes(eslots_ptr, n, r_ok, E, SKIP_PAGE)
    if tl.max(live.to(tl.int32), 0) > 0:
        part = part_ptr + w * sp_w + rows[:, None] * DM
        if MLP:  # silu(x·W1 + b) · W2: the whole hidden row, a BN-wide chunk at a time
            acc = tl.zeros((BR, BN), tl.float32)
            for k0 in tl.range(0, DM, BN, num_stages=FSTAGES):
                kc = k0 + tl.arange(0, BN)
                w2 = tl.load(w2_ptr + w * sw2_w + kc[:, None] * DM + cols[None, :])
                hid = tl.load(b_ptr + w * DM + kc).to(tl.float32)[None, :]
                for g in tl.static_range(KS):
                    hid += tl.load(part + g * sp_s + kc[None, :], mask=live[:, None], other=0.0)
                hid = hid / (1.0 + tl.exp(-hid))
                a = hid.to(w2.dtype)
                if UPCAST:
                    a = a.to(tl.float32)
                    w2 = w2.to(tl.float32)
                acc = tl.dot(a, w2, acc, input_precision=PREC)
        else:  # x·W1 + b
            acc = tl.load(b_ptr + w * DM + cols).to(tl.float32)[None, :]
            for g in tl.static_range(KS):
                acc += tl.load(part + g * sp_s + cols[None, :], mask=live[:, None], other=0.0)
        page, e = (slot // E)[:, None], (slot % E)[:, None]
        if w == 0:
            ok = live[:, None] & (cols < DK)[None, :]
            tl.store(kc_ptr + page * skc_p + h[:, None] * skc_h + e * skc_r + cols[None, :],
                     acc.to(kc_ptr.dtype.element_ty), mask=ok)
        else:
            ok = live[:, None] & (cols < DV)[None, :]
            tl.store(vc_ptr + page * svc_p + h[:, None] * svc_h + e * svc_r + cols[None, :],
                     acc.to(vc_ptr.dtype.element_ty), mask=ok)


def column_tile(dm: int) -> int:
    """The widest power of two ≤ 64 dividing Dm: both kernels' K chunk and column tile (a chunk
    must stay inside one token's row). 0 when it is under 16, the matrix units' smallest side."""
    t = 64
    while t >= 16 and dm % t:
        t //= 2
    return t if t >= 16 else 0


def phi_write_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, block_slots: torch.Tensor,
                   kc_cache: torch.Tensor, vc_cache: torch.Tensor, entry_slots: torch.Tensor,
                   w1: torch.Tensor, bias: torch.Tensor, w2: torch.Tensor | None,
                   splits: int | None = None, stages: int = 3, skip_page: int = -1,
                   row_tiles: int = 1) -> None:
    """kc/vc_cache[entry_slots] = φ_K / φ_V of the l tokens at block_slots [N, l] of k/v_cache.

    Caches [pages, Hkv, rows, D] (summary caches: rows = entries a page); slots are flat
    (page · rows + row) int32/int64, −1 = none (a block slot reads zeros, an entry slot writes
    nothing). w1 [2, l·Dm, Dm], bias [2, 1, Dm], w2 [2, Dm, Dm] or None: `NSAAttention.fuse_phi`'s
    stacked weights. `splits`: pieces of the first product's l-token reduction (default SPLITS; at
    most MAX_SPLITS and l; more: more programs stream the weights; fewer: fewer float32 partials for
    the finish to read); `stages`: its software pipeline's depth; `row_tiles`: tiles of up to 64
    rows (block rows × kv heads) a partial program walks one after the other (more: fewer programs,
    each weight slice read once for more rows). `skip_page`: a page whose entry slots count as "no
    summary" (a CUDA graph's trash page, where padding rows and rows completing no block point);
    when no row writes, neither kernel reads anything."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache), ("kc_cache", kc_cache), ("vc_cache", vc_cache)):
        if c.dim() != 4:
            raise ValueError(f"{name} must be [pages, heads, rows, D], got {tuple(c.shape)}")
        check_last_dim_contiguous(name, c)
    if block_slots.dim() != 2 or entry_slots.shape != (block_slots.shape[0],):
        raise ValueError(f"block_slots must be [N, l] and entry_slots [N], got {tuple(block_slots.shape)} "
                         f"and {tuple(entry_slots.shape)}")
    N, LB = block_slots.shape
    H, R, DK, DV = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    DM = max(DK, DV)
    if k_cache.shape[:3] != v_cache.shape[:3] or kc_cache.shape[:3] != vc_cache.shape[:3]:
        raise ValueError("k/v caches (and kc/vc caches) must share pages, heads and rows")
    if kc_cache.shape[1] != H or kc_cache.shape[3] != DK or vc_cache.shape[3] != DV:
        raise ValueError("summary caches must have the raw caches' heads and head dims")
    if w1.shape != (2, LB * DM, DM) or bias.shape != (2, 1, DM) or (w2 is not None and w2.shape != (2, DM, DM)):
        raise ValueError(f"weights must be w1 [2, {LB * DM}, {DM}], bias [2, 1, {DM}], w2 [2, {DM}, {DM}] "
                         f"or None; got {tuple(w1.shape)}, {tuple(bias.shape)}, "
                         f"{None if w2 is None else tuple(w2.shape)}")
    BN = column_tile(DM)
    if not BN:
        raise ValueError(f"phi_write_pair needs max(Dk, Dv) divisible by 16, got {DM}: use the gather + phi_pair path")
    if N == 0:
        return
    w1, bias = w1.contiguous(), bias.contiguous()
    w2 = w2.contiguous() if w2 is not None else None
    NR = N * H
    if splits is None:
        splits = SPLITS
    tps = triton.cdiv(LB, max(1, min(splits, MAX_SPLITS, LB)))  # tokens a split
    KS = triton.cdiv(LB, tps)
    if row_tiles < 1:
        raise ValueError(f"row_tiles must be ≥ 1, got {row_tiles}")
    BR = min(64, max(16, triton.next_power_of_2(NR)))
    row_groups = triton.cdiv(triton.cdiv(NR, BR), row_tiles)
    part = torch.empty((KS, 2, NR, DM), dtype=torch.float32, device=k_cache.device)
    up, prec = interpreter_upcast(k_cache.dtype), dot_precision(k_cache.dtype)
    es, E = entry_slots.contiguous(), kc_cache.shape[2]
    _phi_partial_kernel[(KS, 2, DM // BN * row_groups)](
        part, part.stride(0), part.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_slots.contiguous(), es, skip_page, w1, w1.stride(0), N, NR, tps, row_tiles,
        H=H, R=R, E=E, LB=LB, DK=DK, DV=DV, DM=DM, BK=BN, BN=BN, BR=BR, NP=triton.next_power_of_2(N),
        STAGES=stages, PREC=prec, UPCAST=up, num_warps=4)
    BR2 = 16  # the finish's tiles: small, so more programs share the partials' reads
    _phi_finish_kernel[(triton.cdiv(NR, BR2), 2, DM // BN)](
        part, part.stride(0), part.stride(1), N, NR, bias, w2 if w2 is not None else w1,
        w2.stride(0) if w2 is not None else 0,
        kc_cache, kc_cache.stride(0), kc_cache.stride(1), kc_cache.stride(2),
        vc_cache, vc_cache.stride(0), vc_cache.stride(1), vc_cache.stride(2), es, skip_page,
        KS=KS, H=H, E=E, DK=DK, DV=DV, DM=DM, BN=BN, BR=BR2, MLP=w2 is not None, FSTAGES=DM // BN,
        PREC=prec, UPCAST=up, num_warps=4)


def phi_write_pair_reference(k_cache, v_cache, block_slots, kc_cache, vc_cache, entry_slots, w1, bias, w2,
                             compute_dtype: torch.dtype | None = None, skip_page: int = -1) -> None:
    """`phi_write_pair` in PyTorch ops: the gather, φ's products (in `compute_dtype`, default the
    weights' dtype), the write of rows whose entry slot is ≥ 0 and not on `skip_page`."""
    dt = compute_dtype or w1.dtype
    x = gather_block_pair_reference(k_cache, v_cache, block_slots).to(dt)  # [2, N·H, l·Dm]
    hid = torch.baddbmm(bias.to(dt), x, w1.to(dt))
    if w2 is not None:
        hid = torch.bmm(torch.nn.functional.silu(hid), w2.to(dt))
    N, H = block_slots.shape[0], k_cache.shape[1]
    E = kc_cache.shape[2]
    slots = entry_slots.long()
    keep = ((slots >= 0) & (slots // E != skip_page)).nonzero().flatten()
    for i, cache in enumerate((kc_cache, vc_cache)):
        D = cache.shape[3]
        s = hid[i].view(N, H, -1)[keep, :, :D]
        cache[slots[keep] // E, :, slots[keep] % E] = s.to(cache.dtype)
