"""Reference NSA attention in plain PyTorch: the obviously-correct twin of every kernel.

Everything here follows DESIGN.md §1 and is written for clarity, not speed. The model's
whole-sequence forward, its incremental step, the CPU serving path and every Triton kernel test
compare against these functions.

Conventions (the project's, documented in docs/nsa.md):
  * Keys are stored *after* RoPE. φ compresses post-RoPE keys, so a compressed key needs no
    rotation of its own and the paged cache never has to un-rotate anything.
  * Compressed entry i covers tokens [i·d, i·d + l); query t sees it when i·d + l − 1 ≤ t.
  * Selection block j covers tokens [j·l', (j+1)·l'). Its score is the overlap-weighted sum of
    compressed probabilities (`selection_weights`), summed over the query heads of a GQA group.
  * The first `num_init` blocks and the `num_local` most recent blocks (the current, partially
    filled one included) are always selected; n counts them. Remaining places go to the highest
    scores; ties go to the lower block index.
  * A query with no visible compressed entry gets a zero compressed-branch output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsityParams:
    """The NSA hyperparameters that shape attention (not the learned parts)."""

    block: int  # l: compression block length
    stride: int  # d: compression stride
    select_block: int  # l': selection block length (= page size in the cache)
    num_select: int  # n: selected blocks per query, forced ones included
    window: int  # w: sliding window length
    num_init: int = 1  # forced initial blocks
    num_local: int = 2  # forced most recent blocks

    def __post_init__(self) -> None:
        for name in ("block", "stride", "select_block", "num_select", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_init < 0 or self.num_local < 1:
            raise ValueError("num_init must be >= 0 and num_local >= 1")
        if self.num_select < self.num_init + self.num_local:
            raise ValueError(
                f"num_select ({self.num_select}) must cover the forced blocks "
                f"(num_init {self.num_init} + num_local {self.num_local})"
            )
        if self.stride > self.block:
            raise ValueError(f"stride d ({self.stride}) must not exceed block l ({self.block})")


def num_compressed(length: int, block: int, stride: int) -> int:
    """Compressed entries whose whole block lies inside the first `length` tokens."""
    if length < block:
        return 0
    return (length - block) // stride + 1


def num_select_blocks(length: int, select_block: int) -> int:
    return (length + select_block - 1) // select_block


def selection_weights(n_cmp: int, n_sel: int, block: int, stride: int, select_block: int,
                      dtype=torch.float32, device=None) -> torch.Tensor:
    """[n_cmp, n_sel] matrix: tokens entry i shares with selection block j, divided by d.

    This is the overlap-weighted reading of the paper's Eq. 9. For l=32, d=16, l'=64 it gives
    selection block j the entries 4j−1 … 4j+3 with weights 1, 2, 2, 2, 1; with l = d = l' it is
    the identity, so p_slc = p_cmp.
    """
    i = torch.arange(n_cmp, device=device).unsqueeze(1)
    j = torch.arange(n_sel, device=device).unsqueeze(0)
    start = torch.maximum(i * stride, j * select_block)
    end = torch.minimum(i * stride + block, (j + 1) * select_block)
    return ((end - start).clamp(min=0).to(dtype)) / stride


def compress_blocks(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Gather every complete compression block: [S, H, D] → [N, H, l, D] (input to φ)."""
    n = num_compressed(x.shape[0], block, stride)
    if n == 0:
        return x.new_zeros((0, x.shape[1], block, x.shape[2]))
    return x.unfold(0, block, stride)[:n].permute(0, 1, 3, 2)


def forced_blocks(positions: torch.Tensor, num_blocks: int, p: SparsityParams) -> torch.Tensor:
    """[T, NB] mask of the blocks every query at `positions` selects whatever its scores: the first
    num_init and the num_local most recent (its own block included), among those it can see."""
    j = torch.arange(num_blocks, device=positions.device)
    cur = positions.div(p.select_block, rounding_mode="floor").unsqueeze(1)  # [T, 1]
    forced = (j.unsqueeze(0) < p.num_init) | (j.unsqueeze(0) > cur - p.num_local)
    return forced & (j.unsqueeze(0) <= cur)


def select_blocks(scores: torch.Tensor, positions: torch.Tensor, p: SparsityParams) -> torch.Tensor:
    """Choose selection blocks from group scores.

    scores: [G, T, NB] (G = kv groups) for queries at `positions` [T]. Returns a boolean mask
    [G, T, NB] with the chosen blocks. Forced blocks are always chosen; then the top scores, ties
    to the lower index; never a block that starts after the query.
    """
    G, T, NB = scores.shape
    j = torch.arange(NB, device=scores.device)
    cur = positions.div(p.select_block, rounding_mode="floor").unsqueeze(1)  # [T, 1]
    visible = j.unsqueeze(0) <= cur  # [T, NB]
    forced = forced_blocks(positions, NB, p)
    key = scores.to(torch.float64).masked_fill(~visible, -math.inf)
    key = key.masked_fill(forced, math.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : p.num_select]
    chosen = torch.zeros(G, T, NB, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, order, True)
    return chosen & visible


def _masked_attention(q, k, v, mask, scale):
    """q [Hq, T, Dk], k [Hq, S, Dk], v [Hq, S, Dv], mask [Hq or 1, T, S] → [Hq, T, Dv].

    Rows with no allowed key return zeros (not NaN).
    """
    if k.shape[1] == 0:  # nothing to attend to (e.g. no complete compression block yet)
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1]), q.new_zeros(q.shape[0], q.shape[1], 0)
    s = torch.einsum("htd,hsd->hts", q, k) * scale
    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("hts,hsd->htd", p, v), p


def nsa_attention(
    q: torch.Tensor,
    positions: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_slc: torch.Tensor,
    v_slc: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    gates: torch.Tensor,
    p: SparsityParams,
    scale: float | None = None,
    return_selection: bool = False,
):
    """NSA attention for queries at absolute `positions` over one sequence's cache.

    q:            [T, Hq, Dk]   (post-RoPE)
    positions:    [T]           absolute positions of the queries (keys 0 … S−1 exist)
    k_cmp, v_cmp: [N, Hkv, Dk] / [N, Hkv, Dv]   compressed entries 0 … N−1 (N ≥ those visible)
    k_slc, v_slc: [S, Hkv, D*]  raw K/V the selection branch attends to
    k_win, v_win: [S, Hkv, D*]  raw K/V the window branch attends to (same tensors when shared)
    gates:        [T, Hq, 3]    sigmoid gates for (compressed, selected, window)
    Returns [T, Hq, Dv] (and the [Hkv, T, NB] selection mask when asked).
    """
    T, Hq, Dk = q.shape
    S, Hkv = k_slc.shape[0], k_slc.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    pos = positions.to(q.device).long()
    if T and int(pos.max()) >= S:
        raise ValueError(f"query position {int(pos.max())} has no key (cache holds {S})")

    def per_head(x):  # [L, Hkv, D] → [Hq, L, D], each kv head repeated for its group
        return x.permute(1, 0, 2).repeat_interleave(G, dim=0)

    qh = q.permute(1, 0, 2)  # [Hq, T, Dk]

    # Compressed branch: entry i visible to query t when i·d + l − 1 ≤ t.
    N = k_cmp.shape[0]
    i = torch.arange(N, device=q.device)
    cmp_mask = (i.unsqueeze(0) * p.stride + p.block - 1) <= pos.unsqueeze(1)  # [T, N]
    o_cmp, p_cmp = _masked_attention(qh, per_head(k_cmp), per_head(v_cmp), cmp_mask.unsqueeze(0), scale)

    # Selection scores: overlap-weighted p_cmp, summed over the group's heads.
    NB = num_select_blocks(S, p.select_block)
    W = selection_weights(N, NB, p.block, p.stride, p.select_block, dtype=p_cmp.dtype, device=q.device)
    p_slc = torch.einsum("htn,nb->htb", p_cmp, W)
    scores = p_slc.reshape(Hkv, G, T, NB).sum(dim=1)  # [Hkv, T, NB]
    chosen = select_blocks(scores, pos, p)  # [Hkv, T, NB]
    s_idx = torch.arange(S, device=q.device)
    tok_mask = chosen[..., s_idx // p.select_block] & (s_idx.unsqueeze(0) <= pos.unsqueeze(1))
    o_slc, _ = _masked_attention(qh, per_head(k_slc), per_head(v_slc),
                                 tok_mask.repeat_interleave(G, dim=0), scale)

    # Window branch: the last w tokens up to and including the query.
    win_mask = (s_idx.unsqueeze(0) <= pos.unsqueeze(1)) & (s_idx.unsqueeze(0) > pos.unsqueeze(1) - p.window)
    o_win, _ = _masked_attention(qh, per_head(k_win), per_head(v_win), win_mask.unsqueeze(0), scale)

    g = gates.permute(1, 0, 2).to(o_cmp.dtype)  # [Hq, T, 3]
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    out = out.permute(1, 0, 2).contiguous()
    if return_selection:
        return out, chosen
    return out


def dense_attention(q, positions, k, v, scale=None):
    """Plain causal attention over one sequence's cache, the dense baseline. Shapes as nsa_attention."""
    T, Hq, Dk = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    pos = positions.to(q.device).long()
    s_idx = torch.arange(S, device=q.device)
    mask = (s_idx.unsqueeze(0) <= pos.unsqueeze(1)).unsqueeze(0)
    kh = k.permute(1, 0, 2).repeat_interleave(G, dim=0)
    vh = v.permute(1, 0, 2).repeat_interleave(G, dim=0)
    out, _ = _masked_attention(q.permute(1, 0, 2), kh, vh, mask, scale)
    return out.permute(1, 0, 2).contiguous()


def tokens_read_per_step(length: int, p: SparsityParams) -> int:
    """K/V tokens one decode step reads per kv group at `length` (DESIGN.md §2), for metrics."""
    sel = min(num_select_blocks(length, p.select_block), p.num_select) * p.select_block
    return num_compressed(length, p.block, p.stride) + min(sel, length) + min(p.window, length)
