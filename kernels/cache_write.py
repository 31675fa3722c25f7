"""The decode write path: new tokens' K/V into their page slots, and compressed-block summaries.

Per layer and step the engine does:
  1. `write_kv(k_cache, k_new, slots)` and the same for V (slots = `paged.token_slots`).
  2. `entries, blk_slots, sum_slots = completed_blocks_decode(block_tables, seq_lens, p)`: which
     compression block (if any) the new token completes, the slots of its l raw tokens and the slot
     its summary goes to (−1 where none completes: fixed shapes, no host sync, graph-capturable).
  3. `blocks = gather_blocks(k_cache, blk_slots)` → [B, Hkv, l, Dk]; apply φ_K (any torch module);
     `write_kv(kc_cache, phi_k(blocks), sum_slots)`, the same for V. Rows with slot −1 are skipped.
     For φ = mean, `write_mean_summaries` does step 3 for K and V in one launch.
For prefill chunks, `block_token_slots` gives the token slots of any list of entries.
Independent-branch checkpoints pass `ring_tables` (the compression branch's cmp_tables): the block's
raw tokens are then read from that ring (P·ceil(l/P) tokens) instead of the shared pages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import check_last_dim_contiguous, next_pow2
from .reference import SparsityParams


@triton.jit
def _write_row(cache_ptr, sc_p, sc_h, sc_r, x_ptr, sx_t, sx_h, t, slot,
               R: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Token t's [H, D] row of x into the cache slot `slot` (page slot // R, row slot % R)."""
    h = tl.arange(0, HP)
    d = tl.arange(0, DP)
    mask = (h[:, None] < H) & (d[None, :] < D)
    x = tl.load(x_ptr + t * sx_t + h[:, None] * sx_h + d[None, :], mask=mask)
    dst = cache_ptr + (slot // R) * sc_p + h[:, None] * sc_h + (slot % R) * sc_r + d[None, :]
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kernel(cache_ptr, sc_p, sc_h, sc_r, x_ptr, sx_t, sx_h, slots_ptr,
                  R: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        _write_row(cache_ptr, sc_p, sc_h, sc_r, x_ptr, sx_t, sx_h, t, slot, R, H, HP, D, DP)


@triton.jit
def _write_pair_kernel(kc_ptr, skc_p, skc_h, skc_r, vc_ptr, svc_p, svc_h, svc_r, k_ptr, sk_t, sk_h,
                       v_ptr, sv_t, sv_h, slots_ptr, R: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                       DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        _write_row(kc_ptr, skc_p, skc_h, skc_r, k_ptr, sk_t, sk_h, t, slot, R, H, HP, DK, DKP)
        _write_row(vc_ptr, svc_p, svc_h, svc_r, v_ptr, sv_t, sv_h, t, slot, R, H, HP, DV, DVP)


def write_kv(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter x [T, H, D] into cache [pages, H, R, D] at flattened (page, row) slots [T].

    Same result as `paged.write_slots`, plus: a negative slot skips its row (padding rows of a
    CUDA-graph batch, or "no summary completes here").
    """
    if x.dim() != 3 or cache.dim() != 4 or x.shape[1:] != (cache.shape[1], cache.shape[3]):
        raise ValueError(f"x {tuple(x.shape)} must be [T, H, D] matching cache {tuple(cache.shape)}")
    if slots.shape != (x.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 vector of length {x.shape[0]}")
    check_last_dim_contiguous("cache", cache)
    check_last_dim_contiguous("x", x)
    if x.shape[0] == 0:
        return
    H, D = x.shape[1], x.shape[2]
    _write_kernel[(x.shape[0],)](cache, cache.stride(0), cache.stride(1), cache.stride(2),
                                 x, x.stride(0), x.stride(1), slots.contiguous(),
                                 R=cache.shape[2], H=H, HP=next_pow2(H), D=D, DP=next_pow2(D))


def write_kv_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """`write_kv(k_cache, k, slots)` and `write_kv(v_cache, v, slots)` in one launch (K and V of the
    same tokens, or the keys' and values' summaries): a layer's writes in a decode step were four
    launches of a few microseconds each, now two."""
    for name, cache, x in (("k", k_cache, k), ("v", v_cache, v)):
        if x.dim() != 3 or cache.dim() != 4 or x.shape[1:] != (cache.shape[1], cache.shape[3]):
            raise ValueError(f"{name} {tuple(x.shape)} must be [T, H, D] matching its cache {tuple(cache.shape)}")
        check_last_dim_contiguous(f"{name} cache", cache)
        check_last_dim_contiguous(name, x)
    if k.shape[:2] != v.shape[:2] or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} and their caches must agree on tokens, "
                         f"heads and rows")
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 vector of length {k.shape[0]}")
    if k.shape[0] == 0:
        return
    H, DK, DV = k.shape[1], k.shape[2], v.shape[2]
    _write_pair_kernel[(k.shape[0],)](
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), slots.contiguous(),
        R=k_cache.shape[2], H=H, HP=next_pow2(H), DK=DK, DKP=next_pow2(DK), DV=DV, DVP=next_pow2(DV))


def block_token_slots(table: torch.Tensor, entries: torch.Tensor, p: SparsityParams, page_size: int,
                      ring: int | None = None) -> torch.Tensor:
    """Token slots [N, l] of compression entries [N] of one sequence (entry i = tokens i·d … i·d+l−1)."""
    pos = entries.long().unsqueeze(1) * p.stride + torch.arange(p.block, device=entries.device)
    if ring is not None:
        pos = pos % ring
    return table.long()[pos // page_size] * page_size + pos % page_size


def completed_blocks_decode(block_tables: torch.Tensor, seq_lens: torch.Tensor, p: SparsityParams,
                            ring_tables: torch.Tensor | None = None):
    """For one new token per sequence (at position seq_lens − 1): the entry it completes.

    Returns (entry [B] int64, block_slots [B, l] int64, summary_slots [B] int64), with −1 in entry,
    block_slots and summary_slots where the token completes no block. Pure tensor ops (no sync).
    """
    P = p.select_block
    E = P // p.stride
    L = seq_lens.long()
    done = (L >= p.block) & ((L - p.block) % p.stride == 0)
    entry = torch.where(done, (L - p.block).clamp(min=0) // p.stride, torch.full_like(L, -1))
    e0 = entry.clamp(min=0)
    pos = e0.unsqueeze(1) * p.stride + torch.arange(p.block, device=L.device)  # [B, l]
    if ring_tables is not None:
        ring = P * ring_tables.shape[1]
        rpos = pos % ring
        slots = ring_tables.long().gather(1, rpos // P) * P + rpos % P
    else:
        slots = block_tables.long().gather(1, pos // P) * P + pos % P
    sum_page = block_tables.long().gather(1, ((e0 * p.stride) // P).unsqueeze(1)).squeeze(1)
    sum_slots = sum_page * E + e0 % E
    neg = torch.full_like(L, -1)
    return entry, torch.where(done.unsqueeze(1), slots, neg.unsqueeze(1)), torch.where(done, sum_slots, neg)


@triton.jit
def _gather_kernel(out_ptr, so_n, so_h, so_t, cache_ptr, sc_p, sc_h, sc_r, slots_ptr,
                   R: tl.constexpr, H: tl.constexpr, LB: tl.constexpr, LBP: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.arange(0, LBP)
    d = tl.arange(0, DP)
    slot = tl.load(slots_ptr + n * LB + t, mask=t < LB, other=-1).to(tl.int64)
    ok = slot >= 0
    mask = ok[:, None] & (d[None, :] < D)
    src = cache_ptr + (slot // R)[:, None] * sc_p + h * sc_h + (slot % R)[:, None] * sc_r + d[None, :]
    x = tl.load(src, mask=mask, other=0.0)
    tl.store(out_ptr + n * so_n + h * so_h + t[:, None] * so_t + d[None, :], x,
             mask=(t[:, None] < LB) & (d[None, :] < D))


def gather_blocks(cache: torch.Tensor, block_slots: torch.Tensor) -> torch.Tensor:
    """[N, H, l, D] raw tokens of N compression blocks (the input of φ); rows with slot −1 are zero."""
    if block_slots.dim() != 2:
        raise ValueError(f"block_slots must be [N, l], got {tuple(block_slots.shape)}")
    check_last_dim_contiguous("cache", cache)
    N, LB = block_slots.shape
    H, D = cache.shape[1], cache.shape[3]
    out = torch.empty(N, H, LB, D, device=cache.device, dtype=cache.dtype)
    if N:
        _gather_kernel[(N, H)](out, out.stride(0), out.stride(1), out.stride(2),
                               cache, cache.stride(0), cache.stride(1), cache.stride(2),
                               block_slots.contiguous(), R=cache.shape[2], H=H, LB=LB,
                               LBP=next_pow2(LB), D=D, DP=next_pow2(D))
    return out


@triton.jit
def _gather_pair_kernel(out_ptr, so_w, so_n, so_h, k_ptr, sk_p, sk_h, sk_r, v_ptr, sv_p, sv_h, sv_r,
                        slots_ptr, R: tl.constexpr, LB: tl.constexpr, LBP: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, DM: tl.constexpr, DMP: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.arange(0, LBP)
    d = tl.arange(0, DMP)
    slot = tl.load(slots_ptr + n * LB + t, mask=t < LB, other=-1).to(tl.int64)
    ok = (slot >= 0)[:, None]
    page, row = (slot // R)[:, None], (slot % R)[:, None]
    out_mask = (t[:, None] < LB) & (d[None, :] < DM)
    dst = out_ptr + n * so_n + h * so_h + t[:, None] * DM + d[None, :]
    if tl.program_id(2) == 0:
        x = tl.load(k_ptr + page * sk_p + h * sk_h + row * sk_r + d[None, :], mask=ok & (d[None, :] < DK), other=0.0)
        tl.store(dst, x, mask=out_mask)
    else:
        x = tl.load(v_ptr + page * sv_p + h * sv_h + row * sv_r + d[None, :], mask=ok & (d[None, :] < DV), other=0.0)
        tl.store(dst + so_w, x, mask=out_mask)


def gather_block_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, block_slots: torch.Tensor) -> torch.Tensor:
    """φ's input for K and V in one launch: [2, N·H, l·Dm] with Dm = max(Dk, Dv), each token's row
    zero-padded to Dm (K first, V second; rows with slot −1 are zero). The layout of
    `NSAAttention.phi_pair`'s batched GEMM; `paged.gather_block_pair_reference` is its twin."""
    if block_slots.dim() != 2:
        raise ValueError(f"block_slots must be [N, l], got {tuple(block_slots.shape)}")
    check_last_dim_contiguous("k_cache", k_cache)
    check_last_dim_contiguous("v_cache", v_cache)
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share pages, heads, page size and dtype")
    N, LB = block_slots.shape
    H, DK, DV = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
    DM = max(DK, DV)
    out = torch.empty(2, N * H, LB * DM, device=k_cache.device, dtype=k_cache.dtype)
    if N:
        _gather_pair_kernel[(N, H, 2)](
            out, out.stride(0), H * out.stride(1), out.stride(1),
            k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_slots.contiguous(), R=k_cache.shape[2], LB=LB, LBP=next_pow2(LB),
            DK=DK, DV=DV, DM=DM, DMP=next_pow2(DM))
    return out


@triton.jit
def _mean_summary_kernel(src_ptr, ss_p, ss_h, ss_r, dst_ptr, sd_p, sd_h, sd_r, bslots_ptr, sslots_ptr,
                         R: tl.constexpr, E: tl.constexpr, LB: tl.constexpr, LBP: tl.constexpr,
                         D: tl.constexpr, DP: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    dslot = tl.load(sslots_ptr + n).to(tl.int64)
    if dslot >= 0:
        t = tl.arange(0, LBP)
        d = tl.arange(0, DP)
        slot = tl.load(bslots_ptr + n * LB + t, mask=t < LB, other=0).to(tl.int64)
        mask = (t[:, None] < LB) & (d[None, :] < D)
        x = tl.load(src_ptr + (slot // R)[:, None] * ss_p + h * ss_h + (slot % R)[:, None] * ss_r
                    + d[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / LB
        tl.store(dst_ptr + (dslot // E) * sd_p + h * sd_h + (dslot % E) * sd_r + d,
                 mean.to(dst_ptr.dtype.element_ty), mask=d < D)


def write_mean_summaries(k_cache, v_cache, kc_cache, vc_cache, block_slots, summary_slots) -> None:
    """Fused φ = mean: kc/vc[summary_slots] = mean of the block's raw K/V (fp32 sum). −1 skips."""
    if block_slots.dim() != 2 or summary_slots.shape != (block_slots.shape[0],):
        raise ValueError("block_slots must be [N, l] and summary_slots [N]")
    N, LB = block_slots.shape
    if N == 0:
        return
    bs, ss = block_slots.contiguous(), summary_slots.contiguous()
    for src, dst in ((k_cache, kc_cache), (v_cache, vc_cache)):
        check_last_dim_contiguous("cache", src)
        check_last_dim_contiguous("summary cache", dst)
        D = src.shape[3]
        _mean_summary_kernel[(N, src.shape[1])](
            src, src.stride(0), src.stride(1), src.stride(2), dst, dst.stride(0), dst.stride(1),
            dst.stride(2), bs, ss, R=src.shape[2], E=dst.shape[2], LB=LB, LBP=next_pow2(LB),
            D=D, DP=next_pow2(D))
