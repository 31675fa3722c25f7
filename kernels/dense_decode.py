"""Dense paged decode (split-K flash-decoding) over the NSA cache's raw pages: the in-house baseline.

Equals `paged.paged_nsa_attention_ref(..., dense=True)` for one new token per sequence. Grid
(B·Hkv, splits): each program walks a contiguous run of a sequence's pages through its block table
and keeps one online-softmax state for all G query heads of its kv group (one K/V load serves the
whole group); `_combine_kernel` merges the splits. Sized from shapes only: CUDA-graph capturable.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import (NEG, _combine_kernel, _dot, _load_q_halves, _online_softmax_step,
                            dot_precision, interpreter_upcast, next_pow2, target_programs)
from .paged import PagedLayerCache


@triton.jit
def _dense_split_kernel(q_ptr, sq_b, sq_h, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                        bt_ptr, sbt_b, lens_ptr, sm_ptr, sl_ptr, sacc_ptr, scale, Hkv,
                        G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DK0: tl.constexpr,
                        DK1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr,
                        NSPLIT: tl.constexpr, AHEAD: tl.constexpr, STAGES: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (group, split) walks pages [split·T, split·T + T) of its sequence, T = ⌈pages /
    NSPLIT⌉: the splits share the sequence's own pages, not the table's width (inside a CUDA graph
    the tables are as wide as the longest sequence served; sized by width, a short sequence's
    pages all fell to its first splits).

    dk is DK0 + DK1 power-of-two dots (192 = 128 + 64) or one padded dot (DK1 = 0). AHEAD: the
    page ids are read a page ahead (a carried pair: a carried scalar id still compiled to
    `async_wait {num = 0}`, the pair to `{num = 3}`), so the software pipeliner (STAGES) can issue a
    page's K/V loads while the previous page computes. With the id loaded in the same iteration it
    waits for every copy (the lesson of the NSA kernels: docs/benchmarks/decode.md, seventh round)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    kh = pid % Hkv
    L = tl.load(lens_ptr + b)
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kh * G + g
    d0 = tl.arange(0, DK0)
    dv = tl.arange(0, DVP)
    r_tok = tl.arange(0, PAGE)
    q0, q1 = _load_q_halves(q_ptr, b * sq_b + heads * sq_h, gmask, DK, DK0, DK1)
    if DK1 > 0:
        d1 = DK0 + tl.arange(0, DK1)
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    n_pages = (L + PAGE - 1) // PAGE
    pps = (n_pages + NSPLIT - 1) // NSPLIT
    lo = split * pps
    hi = tl.minimum(lo + pps, n_pages)
    if AHEAD:
        two = tl.arange(0, 2)
        ids_n = tl.load(bt_ptr + b * sbt_b + lo + two, mask=lo + two < hi, other=0)
    for pg in tl.range(lo, hi, num_stages=STAGES):
        if AHEAD:
            phys = tl.sum(tl.where(two == 0, ids_n, 0)).to(tl.int64)
            ids_n = tl.load(bt_ptr + b * sbt_b + pg + 1 + two, mask=pg + 1 + two < hi, other=0)
        else:
            phys = tl.load(bt_ptr + b * sbt_b + pg).to(tl.int64)
        pos = pg * PAGE + r_tok
        tmask = pos < L
        kbase = k_ptr + phys * sk_p + kh * sk_h + r_tok[:, None] * sk_r
        k0 = tl.load(kbase + d0[None, :], mask=tmask[:, None] & (d0[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + phys * sv_p + kh * sv_h + r_tok[:, None] * sv_r + dv[None, :],
                    mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)
        s = _dot(q0, tl.trans(k0), PREC, UPCAST)
        if DK1 > 0:
            k1 = tl.load(kbase + d1[None, :], mask=tmask[:, None] & (d1[None, :] < DK), other=0.0)
            s += _dot(q1, tl.trans(k1), PREC, UPCAST)
        s = tl.where(tmask[None, :], s * scale, float("-inf"))
        m, l, acc, _ = _online_softmax_step(m, l, acc, s, v, PREC, UPCAST)
    rows = b * (Hkv * G) + heads
    o = rows * NSPLIT + split
    tl.store(sm_ptr + o, m, mask=gmask)
    tl.store(sl_ptr + o, l, mask=gmask)
    tl.store(sacc_ptr + o[:, None] * DV + dv[None, :], acc, mask=gmask[:, None] & (dv[None, :] < DV))


# Launch defaults of the dense baseline. Until the ninth session the kernel read each page id in
# the iteration that loads the page and padded dk to a power of two (8 warps, "previous"); "ahead"
# reads the id a page early so copies overlap (3 stages) and splits dk like the NSA kernels (4 warps).
# H200, 64k, paper shape, CUDA graph (docs/benchmarks/decode.md, ninth session): batch 1 63.1 →
# 58.1 µs, batch 16 1113.6 → 789.4, batch 64 2925.4 → 2407.5. "previous" stays for `--compare`.
DENSE_LAUNCH = {"ahead": dict(ahead=True, split_dk=True, stages=3, num_warps=4),
                "previous": dict(ahead=False, split_dk=False, stages=None, num_warps=8)}  # None: Triton's default
DENSE_DEFAULT = "ahead"


def dense_paged_decode(q: torch.Tensor, layer: PagedLayerCache, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float | None = None,
                       num_splits: int | None = None, num_warps: int | None = None,
                       launch: str | None = None) -> torch.Tensor:
    """Causal attention of one new token per sequence over all its pages. q [B, Hq, Dk] → [B, Hq, Dv].

    `launch`: a DENSE_LAUNCH key (default DENSE_DEFAULT); results equal to float rounding."""
    from .nsa_decode import _check_inputs  # one place for the shared shape checks

    _check_inputs(q, None, layer, block_tables, seq_lens, None, None)
    B, Hq, Dk = q.shape
    _, Hkv, P, _ = layer.k_cache.shape
    Dv = layer.v_cache.shape[-1]
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    max_pages = block_tables.shape[1]
    if num_splits is None:
        num_splits = max(1, min(max_pages, triton.cdiv(target_programs(q.device), B * Hkv)))
    nsplit = triton.cdiv(max_pages, triton.cdiv(max_pages, num_splits))
    dev, f32 = q.device, torch.float32
    sm = torch.empty(B, Hq, nsplit, device=dev, dtype=f32)
    sl = torch.empty_like(sm)
    sacc = torch.empty(B, Hq, nsplit, Dv, device=dev, dtype=f32)
    cfg = DENSE_LAUNCH.get(launch or DENSE_DEFAULT)
    if cfg is None:
        raise ValueError(f"launch must be one of {sorted(DENSE_LAUNCH)}, got {launch!r}")
    from .nsa_decode import _split_dk

    DK0, DK1 = _split_dk(Dk) if cfg["split_dk"] else (next_pow2(Dk), 0)
    k, v = layer.k_cache, layer.v_cache
    _dense_split_kernel[(B * Hkv, nsplit)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), block_tables, block_tables.stride(0), seq_lens,
        sm, sl, sacc, scale, Hkv,
        G=G, GP=max(16, next_pow2(G)), DK=Dk, DK0=DK0, DK1=DK1, DV=Dv, DVP=next_pow2(Dv), PAGE=P,
        NSPLIT=nsplit, AHEAD=cfg["ahead"], STAGES=cfg["stages"], PREC=dot_precision(q.dtype),
        UPCAST=interpreter_upcast(q.dtype), num_warps=num_warps or cfg["num_warps"])
    out = torch.empty(B, Hq, Dv, device=dev, dtype=q.dtype)
    _combine_kernel[(B * Hq,)](
        out, out.stride(0), out.stride(1), out, 0, 0,
        sm, sl, sacc, sm, sl, sacc, sm, sl, sacc, Hq, 1, nsplit, NSA=False, NC_P=2,
        NS_P=max(2, next_pow2(nsplit)), DV=Dv, DVP=next_pow2(Dv), num_warps=4)
    return out
