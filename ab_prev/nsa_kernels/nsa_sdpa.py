"""NSA attention on torch's fused `scaled_dot_product_attention`: the trainer's attention and the
engine's prompt-chunk attention where no Triton kernel runs (CPU).

Same math as the reference `nsa_attention` (tests compare outputs and gradients in float64), for a
batch of equal-length sequences and a chunk of consecutive queries. Why a second formulation: the
reference spells each branch as einsum → masked_fill → amax → exp → sum → divide → einsum over
[heads, T, S], about a dozen full passes over T² memory per branch forward and more backward, and it
takes one sequence at a time, so short sequences are bound by kernel launches. Here each branch is
one fused attention call (flash-style: scores never stored, the backward recomputes them) with a
boolean mask, over a whole batch, and the window branch only sees the keys its chunk can reach.

What stays outside the fused calls is what cannot be expressed as a masked attention:
  * top-n selection needs the compressed branch's probabilities. Selection is discrete (no gradient
    flows through which blocks are chosen), so the probabilities are recomputed without autograd, in
    at least float32, and fed to the reference `select_blocks`: ties break exactly as there.
  * a query that sees no compressed entry yet (t < l − 1) gets zeros from that branch, as in the
    reference. A fused kernel would return NaN for an all-masked row, so such rows are let see entry 0
    and their output is multiplied by 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .paged import PagedLayerCache, gather_ring, gather_sequence
from .reference import SparsityParams, num_select_blocks, select_blocks, selection_weights


def _heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, L, Hkv, D] → [B, Hkv·group, L, D]: each kv head repeated for the query heads of its group."""
    return x.transpose(1, 2).repeat_interleave(group, dim=1)


def selection_scores(q: torch.Tensor, kc: torch.Tensor, visible: torch.Tensor, num_blocks: int,
                     p: SparsityParams, scale: float) -> torch.Tensor:
    """Group-summed, overlap-weighted compressed probabilities [B, Hkv, C, NB] (no autograd).

    q [B, C, Hq, Dk], kc [B, N, Hkv, Dk], visible [C, N] (the compressed branch's mask).
    """
    B, C, Hq, Dk = q.shape
    N, Hkv = kc.shape[1], kc.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        qg = q.detach().to(dt).view(B, C, Hkv, Hq // Hkv, Dk)
        s = torch.einsum("bchgd,bnhd->bhgcn", qg, kc.detach().to(dt)) * scale
        s = s.masked_fill(~visible, -math.inf)
        prob = torch.softmax(s, dim=-1)
        prob = torch.where(visible.any(-1, keepdim=True), prob, torch.zeros_like(prob))  # no NaN rows
        W = selection_weights(N, num_blocks, p.block, p.stride, p.select_block, dtype=dt, device=q.device)
        return torch.einsum("bhgcn,nk->bhck", prob, W)


def nsa_attention_batched(q: torch.Tensor, start: int, kc: torch.Tensor, vc: torch.Tensor,
                          ks: torch.Tensor, vs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor,
                          gates: torch.Tensor, p: SparsityParams, scale: float | None = None) -> torch.Tensor:
    """NSA attention for queries at positions start … start+C−1 of B sequences.

    q:            [B, C, Hq, Dk]  (post-RoPE)
    kc, vc:       [B, N, Hkv, D*] compressed entries 0 … N−1 (entries a query may not see are masked)
    ks, vs:       [B, S, Hkv, D*] raw K/V of the selection branch, keys 0 … S−1, S = start + C
    kw, vw:       [B, S, Hkv, D*] raw K/V of the window branch (the same tensors when shared)
    gates:        [B, C, Hq, 3]
    Returns [B, C, Hq, Dv].
    """
    B, C, Hq, Dk = q.shape
    S, Hkv = ks.shape[1], ks.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if S != start + C:
        raise ValueError(f"keys ({S}) must end where the query chunk ends ({start} + {C})")
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    dev = q.device
    pos = torch.arange(start, start + C, device=dev)
    qh = q.transpose(1, 2)  # [B, Hq, C, Dk]
    NB = num_select_blocks(S, p.select_block)

    # Compressed branch: entry i visible to query t when i·d + l − 1 ≤ t.
    N = kc.shape[1]
    if N:
        i = torch.arange(N, device=dev)
        visible = (i.unsqueeze(0) * p.stride + p.block - 1) <= pos.unsqueeze(1)  # [C, N]
        has_any = visible.any(-1, keepdim=True)  # [C, 1]
        safe = visible | (~has_any & (i.unsqueeze(0) == 0))
        o_cmp = F.scaled_dot_product_attention(qh, _heads(kc, G), _heads(vc, G), attn_mask=safe, scale=scale)
        o_cmp = o_cmp * has_any.to(o_cmp.dtype)
        scores = selection_scores(q, kc, visible, NB, p, scale)
    else:
        o_cmp = q.new_zeros(B, Hq, C, vc.shape[-1])
        scores = torch.zeros(B, Hkv, C, NB, device=dev)

    # Selected branch: the chosen blocks' tokens up to the query.
    chosen = select_blocks(scores.reshape(B * Hkv, C, NB), pos, p).view(B, Hkv, C, NB)
    s_idx = torch.arange(S, device=dev)
    tok = chosen[..., s_idx // p.select_block] & (s_idx <= pos.unsqueeze(1))  # [B, Hkv, C, S]
    o_slc = F.scaled_dot_product_attention(qh, _heads(ks, G), _heads(vs, G),
                                           attn_mask=tok.repeat_interleave(G, dim=1), scale=scale)

    # Window branch: the last w tokens up to and including the query; keys before the chunk's
    # reach are not even looked at (start − w keeps the slice aligned when start and w are).
    lo = max(0, start - p.window)
    w_idx = torch.arange(lo, S, device=dev)
    wmask = (w_idx <= pos.unsqueeze(1)) & (w_idx > pos.unsqueeze(1) - p.window)  # [C, S − lo]
    o_win = F.scaled_dot_product_attention(qh, _heads(kw[:, lo:], G), _heads(vw[:, lo:], G),
                                           attn_mask=wmask, scale=scale)

    g = gates.transpose(1, 2).to(o_slc.dtype)  # [B, Hq, C, 3]
    out = g[..., 0:1] * o_cmp.to(o_slc.dtype) + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return out.transpose(1, 2)


def paged_nsa_prefill_sdpa(q, gates, layer: PagedLayerCache, block_tables, cu_seqlens_q, seq_lens,
                           p: SparsityParams, win_tables=None, scale=None):
    """`paged_nsa_attention_ref`'s contract (varlen rows over the paged cache; each sequence's rows are
    its last tokens, already written with their summaries), one sequence at a time through
    `nsa_attention_batched`. On a CPU a 2k-row chunk over 16k keys of the default model takes 1.2 s
    instead of the reference's 10.9 s per layer (2-core VM, 2026-11-25): the reference materialises
    about ten [heads, T, S] tensors per branch."""
    out = q.new_empty(q.shape[0], q.shape[1], layer.v_cache.shape[-1])
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        L = lens[b]
        k, v, kc, vc = gather_sequence(layer, block_tables[b], L, p)
        if win_tables is not None:
            kw, vw = gather_ring(layer, win_tables[b], win_tables.shape[1] * layer.page_size, L)
        else:
            kw, vw = k, v
        out[lo:hi] = nsa_attention_batched(q[None, lo:hi], L - (hi - lo), kc[None], vc[None], k[None], v[None],
                                           kw[None], vw[None], gates[None, lo:hi], p, scale)[0]
    return out
