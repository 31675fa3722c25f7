"""The paged NSA cache layout and its PyTorch reference operations (DESIGN.md §3).

This file is the contract between the serving engine and the Triton kernels: both read and write
exactly these tensors, and every kernel is tested against the reference functions here (which
gather pages into contiguous tensors and call `reference.nsa_attention`).

Per layer (P = page size = l', the selection block; E = P // d summaries per page):
  k_cache  [num_pages, Hkv, P, Dk]   raw keys (post-RoPE), one head's page is contiguous
  v_cache  [num_pages, Hkv, P, Dv]   raw values
  kc_cache [num_pages, Hkv, E, Dk]   compressed keys: entry i lives in the page its block starts in,
  vc_cache [num_pages, Hkv, E, Dv]   page = block_table[i·d // P], row i mod E

Tables (int32, padded with 0 past the end; the page ids index dim 0 of the caches):
  block_tables [B, max_pages]  page j of a sequence holds its tokens [j·P, (j+1)·P) and the
                               summaries that start there; also the selection block index.
  win_tables   [B, w // P]     independent-K/V checkpoints only: the window branch's own K/V in a
                               ring of w tokens (position s → ring page (s mod w) // P, row s mod P).
  cmp_tables   [B, ceil(l / P)] independent-K/V only: the compression branch's raw K/V in a ring of
                               P·ceil(l/P) tokens, from which φ makes each new summary.
With shared K/V there are no rings: window and φ read the raw pages.

Slot ids flatten (page, row): a token slot is page·P + row, a summary slot is page·E + row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import SparsityParams, dense_attention, nsa_attention, num_compressed


@dataclass
class PagedLayerCache:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kc_cache: torch.Tensor
    vc_cache: torch.Tensor

    @classmethod
    def allocate(cls, num_pages: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                 page_size: int, stride: int, dtype=torch.float32, device=None) -> "PagedLayerCache":
        E = page_size // stride
        return cls(
            torch.zeros(num_pages, num_kv_heads, page_size, head_dim_k, dtype=dtype, device=device),
            torch.zeros(num_pages, num_kv_heads, page_size, head_dim_v, dtype=dtype, device=device),
            torch.zeros(num_pages, num_kv_heads, E, head_dim_k, dtype=dtype, device=device),
            torch.zeros(num_pages, num_kv_heads, E, head_dim_v, dtype=dtype, device=device),
        )

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[2]

    @property
    def summaries_per_page(self) -> int:
        return self.kc_cache.shape[2]


def token_slots(table: torch.Tensor, positions: torch.Tensor, page_size: int, ring: int | None = None):
    """Slot ids of `positions` through one sequence's `table` (a ring of `ring` tokens if given)."""
    pos = positions.long()
    if ring is not None:
        pos = pos % ring
    return table.long()[pos // page_size] * page_size + pos % page_size


def summary_slots(table: torch.Tensor, entries: torch.Tensor, stride: int, page_size: int):
    E = page_size // stride
    return table.long()[(entries.long() * stride) // page_size] * E + entries.long() % E


def write_slots(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter x [T, Hkv, D] into cache [pages, Hkv, R, D] at flattened (page, row) `slots` [T]."""
    R = cache.shape[2]
    # Index dims 0 and 2 together: the result/target has shape [T, Hkv, D].
    cache[slots // R, :, slots % R] = x.to(cache.dtype)


def read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Gather [T, Hkv, D] from cache at flattened (page, row) `slots` [T]."""
    R = cache.shape[2]
    return cache[slots // R, :, slots % R]


def gather_sequence(layer: PagedLayerCache, table: torch.Tensor, length: int, p: SparsityParams):
    """One sequence's raw K/V [length, Hkv, D] and visible summaries [N, Hkv, D] as contiguous tensors."""
    pos = torch.arange(length, device=layer.k_cache.device)
    slots = token_slots(table, pos, layer.page_size)
    n = num_compressed(length, p.block, p.stride)
    ent = summary_slots(table, torch.arange(n, device=pos.device), p.stride, layer.page_size)
    return (read_slots(layer.k_cache, slots), read_slots(layer.v_cache, slots),
            read_slots(layer.kc_cache, ent), read_slots(layer.vc_cache, ent))


def gather_ring(layer: PagedLayerCache, ring_table: torch.Tensor, ring: int, length: int):
    """The last min(ring, length) tokens held in a ring, placed at their absolute positions in
    [length, Hkv, D] tensors (older positions are zero and must be masked by the caller)."""
    k = layer.k_cache.new_zeros(length, *layer.k_cache.shape[1:2], layer.k_cache.shape[3])
    v = layer.v_cache.new_zeros(length, *layer.v_cache.shape[1:2], layer.v_cache.shape[3])
    pos = torch.arange(max(0, length - ring), length, device=k.device)
    slots = token_slots(ring_table, pos, layer.page_size, ring=ring)
    k[pos] = read_slots(layer.k_cache, slots)
    v[pos] = read_slots(layer.v_cache, slots)
    return k, v


def paged_nsa_attention_ref(q, gates, layer: PagedLayerCache, block_tables, cu_seqlens_q, seq_lens,
                            p: SparsityParams, win_tables=None, scale=None, dense: bool = False):
    """Reference NSA attention for a varlen batch over the paged cache.

    q [Ttot, Hq, Dk], gates [Ttot, Hq, 3]; sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
    which are its last tokens (positions seq_lens[b] − T_b … seq_lens[b] − 1, all already written
    to the cache together with every summary they complete). Decode is the case T_b = 1.
    `win_tables` is given for independent-K/V caches: the window branch then reads its ring.
    `dense=True` computes plain causal attention over the same pages (the dense baseline).
    Returns [Ttot, Hq, Dv].
    """
    out = q.new_empty(q.shape[0], q.shape[1], layer.v_cache.shape[-1])
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        L = lens[b]
        positions = torch.arange(L - (hi - lo), L, device=q.device)
        k, v, kc, vc = gather_sequence(layer, block_tables[b], L, p)
        if dense:
            out[lo:hi] = dense_attention(q[lo:hi], positions, k, v, scale)
            continue
        if win_tables is not None:
            kw, vw = gather_ring(layer, win_tables[b], win_tables.shape[1] * layer.page_size, L)
        else:
            kw, vw = k, v
        out[lo:hi] = nsa_attention(q[lo:hi], positions, kc, vc, k, v, kw, vw, gates[lo:hi], p, scale)
    return out


def gather_block_pair_reference(k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_slots: torch.Tensor) -> torch.Tensor:
    """φ's K and V input [2, N·H, l·Dm] (Dm = max(Dk, Dv); each token's row zero-padded to Dm; rows
    with slot −1 zero): the twin of `cache_write.gather_block_pair`, and the engine's path off CUDA."""
    R = k_cache.shape[2]
    DM = max(k_cache.shape[3], v_cache.shape[3])
    slots = block_slots.long()
    ok = (slots >= 0)[:, None, :, None]
    s = slots.clamp(min=0)
    parts = []
    for cache in (k_cache, v_cache):
        x = cache[s // R, :, s % R].permute(0, 2, 1, 3)  # [N, H, l, D]
        x = torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device))
        x = F.pad(x, (0, DM - x.shape[-1]))
        parts.append(x.reshape(x.shape[0] * x.shape[1], -1))
    return torch.stack(parts)
