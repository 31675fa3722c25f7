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

1. `_phi_partial_kernel`, grid (K split, K-or-V, output-column tile): reads its rows' block tokens
   straight from the paged cache (the gather) and multiplies them by its slice of the first weight,
   writing float32 partial sums. Splitting the l·Dm-long reduction is what puts the weight read on
   enough SMs.
2. `_phi_finish_kernel`, grid (row tile, K-or-V, output-column tile): sums the partials in a fixed
   order (deterministic, no atomics), adds the bias, then for the MLP form applies SiLU and the
   second [Dm, Dm] product, and writes the summary into its slot (slot −1: no write).

In a step that does write, the two launches took 27–33 µs a layer at 1–16 sequences against the
five launches' 23–24 µs (H200, paper-1b): the finish's serial per-chunk work costs more than the
split saves. The skip (2.6–2.8 µs) is what wins, which is why the engine uses this at small batch
only (`nsa_serve.engine.decode_graphs.FUSED_PHI_MAX_BATCH`).

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

# The first product's reduction in 8 pieces (48 programs at the paper shape): what the engine was
# measured with. 16 with this 4-warp finish was faster in the kernel bench before the skip's checks
# were added (22.5 against 27.3 µs at 8 sequences, H200) and is the next thing to measure
# (docs/benchmarks/engine.md, twenty-seventh session).
SPLITS = 8
MAX_SPLITS = 16


@triton.jit
def _writes(eslots_ptr, n, ok, E: tl.constexpr, SKIP_PAGE):
    """Whether row n's summary is written: its entry slot is set and not on the skip page."""
    e = tl.load(eslots_ptr + n, mask=ok, other=-1).to(tl.int64)
    return ok & (e >= 0) & (e // E != SKIP_PAGE), e


@triton.jit
def _phi_partial_kernel(part_ptr, sp_s, sp_w, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                        slots_ptr, eslots_ptr, SKIP_PAGE, w_ptr, sw_w, N, NR, CPS,
                        H: tl.constexpr, R: tl.constexpr, E: tl.constexpr, LB: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, DM: tl.constexpr, BK: tl.constexpr,
                        BN: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr, STAGES: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (s, w, c): Σ over K chunks [s·CPS, (s+1)·CPS) of x[rows, chunk] · W1[w, chunk, c-tile].

    A chunk is BK consecutive columns of one token's Dm-wide row (BK divides Dm), so its x is one
    contiguous read per row: token t's row of kv head h in the page its slot names. The loop has
    no branch, so Triton pipelines its loads (the weight slab is what streams from HBM); chunks
    wholly in V's zero padding are read and multiplied like the others. When no row of the step
    writes a summary (most decode steps: a sequence completes a block every d tokens), nothing is
    read at all."""
    s = tl.program_id(0)
    w = tl.program_id(1)
    every = tl.arange(0, NP)
    any_row, _any_e = _writes(eslots_ptr, every, every < N, E, SKIP_PAGE)
    if tl.max(any_row.to(tl.int32), 0) > 0:
        cols = tl.program_id(2) * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        NCH: tl.constexpr = LB * DM // BK
        c0 = s * CPS
        c1 = tl.minimum(c0 + CPS, NCH)
        is_k = w == 0
        d_w = tl.where(is_k, DK, DV)  # K's or V's own width; the padding to Dm is zeros
        w_base = w_ptr + w * sw_w + cols[None, :]
        for r0 in range(0, NR, BR):
            rows = r0 + tl.arange(0, BR)
            r_ok = rows < NR
            n, h = rows // H, rows % H
            live, _live_e = _writes(eslots_ptr, n, r_ok, E, SKIP_PAGE)  # other rows' blocks are not read
            head_k = (h * sk_h)[:, None]
            head_v = (h * sv_h)[:, None]
            acc = tl.zeros((BR, BN), tl.float32)
            for c in tl.range(c0, c1, num_stages=STAGES):
                t = (c * BK) // DM
                j = (c * BK) % DM + kk
                slot = tl.load(slots_ptr + n * LB + t, mask=live, other=-1).to(tl.int64)
                ok = (live & (slot >= 0))[:, None] & (j < d_w)[None, :]
                page, rr = (slot // R)[:, None], (slot % R)[:, None]
                src = tl.where(is_k, k_ptr + page * sk_p + head_k + rr * sk_r + j[None, :],
                               v_ptr + page * sv_p + head_v + rr * sv_r + j[None, :])
                x = tl.load(src, mask=ok, other=0.0)
                wt = tl.load(w_base + (c * BK + kk)[:, None] * DM)
                if UPCAST:  # the CPU interpreter's dot multiplies bf16's raw bits
                    x = x.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(x, wt, acc, input_precision=PREC)
            tl.store(part_ptr + s * sp_s + w * sp_w + rows[:, None] * DM + cols[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _phi_finish_kernel(part_ptr, sp_s, sp_w, N, NR, b_ptr, w2_ptr, sw2_w,
                       kc_ptr, skc_p, skc_h, skc_r, vc_ptr, svc_p, svc_h, svc_r, eslots_ptr, SKIP_PAGE,
                       KS: tl.constexpr, KSP: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, DM: tl.constexpr, BN: tl.constexpr,
                       BR: tl.constexpr, MLP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (r, w, c): summary columns c-tile of rows r-tile for K (w = 0) or V (w = 1). The KS
    partials of a tile are one [KSP, BR, BN] read summed in registers (a loop over them waited on
    each read in turn). A tile with no row to write reads nothing."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    w = tl.program_id(1)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    r_ok = rows < NR
    n, h = rows // H, rows % H
    live, slot = _writes(eslots_ptr, n, r_ok, E, SKIP_PAGE)
    if tl.max(live.to(tl.int32), 0) > 0:
        ks = tl.arange(0, KSP)
        part = part_ptr + w * sp_w + ks[:, None, None] * sp_s + rows[None, :, None] * DM
        pmask = (ks < KS)[:, None, None] & live[None, :, None]
        if MLP:  # silu(x·W1 + b) · W2: the whole hidden row, a BN-wide chunk at a time
            acc = tl.zeros((BR, BN), tl.float32)
            for k0 in tl.static_range(0, DM, BN):
                kc = k0 + tl.arange(0, BN)
                hid = tl.sum(tl.load(part + kc[None, None, :], mask=pmask, other=0.0), 0)
                hid += tl.load(b_ptr + w * DM + kc).to(tl.float32)[None, :]
                hid = hid / (1.0 + tl.exp(-hid))
                w2 = tl.load(w2_ptr + w * sw2_w + kc[:, None] * DM + cols[None, :])
                a = hid.to(w2.dtype)
                if UPCAST:
                    a = a.to(tl.float32)
                    w2 = w2.to(tl.float32)
                acc = tl.dot(a, w2, acc, input_precision=PREC)
        else:  # x·W1 + b
            acc = tl.sum(tl.load(part + cols[None, None, :], mask=pmask, other=0.0), 0)
            acc += tl.load(b_ptr + w * DM + cols).to(tl.float32)[None, :]
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
                   splits: int | None = None, stages: int = 4, skip_page: int = -1) -> None:
    """kc/vc_cache[entry_slots] = φ_K / φ_V of the l tokens at block_slots [N, l] of k/v_cache.

    Caches [pages, Hkv, rows, D] (summary caches: rows = entries a page); slots are flat
    (page · rows + row) int32/int64, −1 = none (a block slot reads zeros, an entry slot writes
    nothing). w1 [2, l·Dm, Dm], bias [2, 1, Dm], w2 [2, Dm, Dm] or None: `NSAAttention.fuse_phi`'s
    stacked weights. `splits`: pieces of the first product's l·Dm-long reduction (default SPLITS,
    at most MAX_SPLITS; more: more programs stream the weights; fewer: fewer float32 partials for
    the finish to read); `stages`: its software pipeline's depth. `skip_page`: a page whose entry slots count as
    "no summary" (a CUDA graph's trash page, where padding rows and rows completing no block
    point); when no row writes, neither kernel reads anything."""
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
    NR, NCT, NCH = N * H, DM // BN, LB * DM // BN
    # The finish holds a tile's KS partials in registers ([KSP, 16, 64] float32 over 4 warps):
    # at most MAX_SPLITS of them.
    cps = triton.cdiv(NCH, max(1, min(SPLITS if splits is None else splits, MAX_SPLITS, NCH)))
    KS = triton.cdiv(NCH, cps)
    BR = min(64, max(16, triton.next_power_of_2(NR)))
    part = torch.empty((KS, 2, NR, DM), dtype=torch.float32, device=k_cache.device)
    up, prec = interpreter_upcast(k_cache.dtype), dot_precision(k_cache.dtype)
    es, E = entry_slots.contiguous(), kc_cache.shape[2]
    _phi_partial_kernel[(KS, 2, NCT)](
        part, part.stride(0), part.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_slots.contiguous(), es, skip_page, w1, w1.stride(0), N, NR, cps,
        H=H, R=R, E=E, LB=LB, DK=DK, DV=DV, DM=DM, BK=BN, BN=BN, BR=BR, NP=triton.next_power_of_2(N),
        STAGES=stages, PREC=prec, UPCAST=up, num_warps=4)
    BR2 = 16  # the finish holds KS partials of its tile: small tiles, more programs
    _phi_finish_kernel[(triton.cdiv(NR, BR2), 2, NCT)](
        part, part.stride(0), part.stride(1), N, NR, bias, w2 if w2 is not None else w1,
        w2.stride(0) if w2 is not None else 0,
        kc_cache, kc_cache.stride(0), kc_cache.stride(1), kc_cache.stride(2),
        vc_cache, vc_cache.stride(0), vc_cache.stride(1), vc_cache.stride(2), es, skip_page,
        KS=KS, KSP=triton.next_power_of_2(KS), H=H, E=E, DK=DK, DV=DV, DM=DM, BN=BN, BR=BR2,
        MLP=w2 is not None, PREC=prec, UPCAST=up, num_warps=4)


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
