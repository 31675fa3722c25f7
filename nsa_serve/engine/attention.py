"""Attention over the paged cache for one engine step: picks the implementation, one interface.

Single-token rows: `nsa_kernels.nsa_decode.nsa_decode` on CUDA, else the reference
`nsa_kernels.paged.paged_nsa_attention_ref` (cheap for one query). Prompt chunks:
`nsa_kernels.nsa_prefill.nsa_prefill` on CUDA, else `nsa_kernels.nsa_sdpa.paged_nsa_prefill_sdpa`
(the same math on torch's fused attention, tested equal to the reference; ~9× faster than the
reference for a 2k chunk over 16k keys on a CPU). `dense` mode computes plain causal attention over the same
pages (the like-for-like baseline; `nsa_kernels.dense_decode.dense_paged_decode` on CUDA).

Independent-K/V checkpoints: the window branch reads its own ring through `win_tables`. The runner
sizes that ring to hold w + (largest chunk) − 1 tokens, so the first query of a prompt chunk still
finds the w − 1 tokens before it after the whole chunk was written (the contract of paged.py).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from nsa_kernels.nsa_sdpa import paged_nsa_prefill_sdpa
from nsa_kernels.paged import PagedLayerCache, paged_nsa_attention_ref
from nsa_kernels.reference import SparsityParams


def _optional(module: str, name: str):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, name, None)


class AttentionBackend:
    def __init__(self, mode: str, device: torch.device, sparsity: SparsityParams):
        if mode not in ("nsa", "dense"):
            raise ValueError(f"attention must be 'nsa' or 'dense', got {mode!r}")
        self.mode = mode
        self.p = sparsity
        self.decode_fn = self.prefill_fn = self.dense_decode_fn = self.prefill_plan_fn = None
        if device.type == "cuda":
            self.decode_fn = _optional("nsa_kernels.nsa_decode", "nsa_decode")
            self.prefill_fn = _optional("nsa_kernels.nsa_prefill", "nsa_prefill")
            self.prefill_plan_fn = _optional("nsa_kernels.nsa_prefill", "plan_prefill")
            self.dense_decode_fn = _optional("nsa_kernels.dense_decode", "dense_paged_decode")
        if self.prefill_fn is None:
            self.prefill_fn = paged_nsa_prefill_sdpa
        # Dense prompt chunks through PyTorch SDPA (flash / memory-efficient kernels) on GPU: the
        # reference materialises [Hq, T, S] scores, which at 64k context is tens of GB per chunk.
        self.dense_prefill_sdpa = device.type == "cuda"

    def describe(self) -> str:
        if self.mode == "dense":
            return "dense: " + ("dense_paged_decode kernel" if self.dense_decode_fn else "reference")
        prefill = "sdpa" if self.prefill_fn is paged_nsa_prefill_sdpa else "kernel" if self.prefill_fn else "reference"
        return f"nsa: decode={'kernel' if self.decode_fn else 'reference'}, prefill={prefill}"

    def __call__(self, q, gates, cache: PagedLayerCache, inp, out: torch.Tensor | None = None,
                 decode_done: bool = False) -> torch.Tensor:
        """q [Ttot, Hq, Dk], gates [Ttot, Hq, 3]; `inp` is the step's StepInputs. Rows of single-token
        sequences come first (inp.num_decode of them), then prompt chunks. `out` [Ttot, Hq, Dv]:
        where to write the result (the piecewise graphs' buffer), else a new tensor.
        `decode_done`: the decode rows' rows of `out` are already written (piecewise_decode);
        only the chunks' are."""
        nd, B = inp.num_decode, inp.num_seqs
        dense = self.mode == "dense"
        rows_dec = inp.cu_host[nd]
        if dense and self.dense_decode_fn is None and not self.dense_prefill_sdpa:
            lo = nd if decode_done else 0  # CPU dense baseline: one call for the step's rows
            if lo == B:
                return out
            res = self._reference(q[inp.cu_host[lo]:], gates[inp.cu_host[lo]:], cache, inp, lo, B)
            if out is None:
                return res
            out[inp.cu_host[lo]:].copy_(res)
            return out
        if out is None:
            out = q.new_empty(q.shape[0], q.shape[1], cache.v_cache.shape[-1])
        if nd and not decode_done:
            bt, lens = inp.block_tables[:nd], inp.seq_lens[:nd]
            if dense and self.dense_decode_fn is not None:
                out[:rows_dec] = self.dense_decode_fn(q[:rows_dec], cache, bt, lens)
            elif not dense and self.decode_fn is not None:
                wt = inp.win_tables[:nd] if inp.win_tables is not None else None
                out[:rows_dec] = self.decode_fn(q[:rows_dec], gates[:rows_dec], cache, bt, lens, self.p,
                                                win_tables=wt)
            else:
                out[:rows_dec] = self._reference(q[:rows_dec], gates[:rows_dec], cache, inp, 0, nd)
        if nd < B:
            if dense and self.dense_prefill_sdpa:
                out[rows_dec:] = dense_prefill_sdpa(q[rows_dec:], cache, inp, nd, B)
            elif not dense and self.prefill_fn is not None:
                cu = inp.cu_seqlens_q[nd:] - inp.cu_seqlens_q[nd]
                wt = inp.win_tables[nd:] if inp.win_tables is not None else None
                kw = {}
                if self.prefill_plan_fn is not None and self.prefill_fn is not paged_nsa_prefill_sdpa:
                    # The kernel's host-side tile layout, built once per step from the host lists
                    # (it was a device sync and an upload in each of the model's layers).
                    if inp.prefill_plan is None:
                        inp.prefill_plan = self.prefill_plan_fn(
                            [c - inp.cu_host[nd] for c in inp.cu_host[nd:]], inp.seq_lens_host[nd:],
                            page_size=cache.page_size, group=q.shape[1] // cache.k_cache.shape[1],
                            device=q.device)
                    kw["plan"] = inp.prefill_plan
                out[rows_dec:] = self.prefill_fn(q[rows_dec:], gates[rows_dec:], cache, inp.block_tables[nd:], cu,
                                                 inp.seq_lens[nd:], self.p, win_tables=wt, **kw)
            else:
                out[rows_dec:] = self._reference(q[rows_dec:], gates[rows_dec:], cache, inp, nd, B)
        return out

    def _reference(self, q, gates, cache, inp, lo: int, hi: int):
        """The PyTorch reference over sequences lo … hi−1 of the step."""
        cu = inp.cu_seqlens_q[lo:hi + 1] - inp.cu_seqlens_q[lo]
        wt = inp.win_tables[lo:hi] if inp.win_tables is not None else None
        return paged_nsa_attention_ref(q, gates, cache, inp.block_tables[lo:hi], cu, inp.seq_lens[lo:hi], self.p,
                                       win_tables=None if self.mode == "dense" else wt,
                                       dense=self.mode == "dense")


def dense_prefill_sdpa(q, cache: PagedLayerCache, inp, lo: int, hi: int) -> torch.Tensor:
    """Causal attention of the prompt-chunk rows of sequences lo … hi−1 over their pages, through
    `F.scaled_dot_product_attention` with a lower-right causal mask (query t of a T-row chunk sees
    keys ≤ L − T + t). Same result as the reference's dense mode (tests/test_engine_attention.py).

    When dv < dk, V is zero-padded to dk and the output sliced back (the padded columns are 0):
    torch dispatches a lower-right causal mask to FlashAttention only for equal head dims, and with
    dk 192 ≠ dv 128 it fell back to a kernel measured at ~130 TFLOP/s on an H200 (an 8k chunk over
    64k keys: 157.8 ms, against 145.2 ms for the whole 64k prompt with is_causal).

    One kv group at a time: its keys and values copied once per query head of the group (and V
    padded) for all 64 query heads at once were ~7 GB at a 128k context for the paper shape, which
    no memory profile counted — the dense server ran out of memory starting on an 80 GB H100
    (2026-12-05). A group's copies are 1/Hkv of that (~1.6 GB at 128k)."""
    from torch.nn.attention.bias import causal_lower_right

    P = cache.page_size
    Hq, Hkv = q.shape[1], cache.k_cache.shape[1]
    G = Hq // Hkv
    Dk, Dv = cache.k_cache.shape[-1], cache.v_cache.shape[-1]
    outs = []
    base = inp.cu_host[lo]
    for b in range(lo, hi):
        r0, r1 = inp.cu_host[b] - base, inp.cu_host[b + 1] - base
        L, T = inp.seq_lens_host[b], r1 - r0
        pages = inp.block_tables[b, :(L + P - 1) // P].long()
        # [pages, Hkv, P, D] → [Hkv, L, D]
        k = cache.k_cache[pages].transpose(0, 1).reshape(Hkv, -1, Dk)[:, :L]
        v = cache.v_cache[pages].transpose(0, 1).reshape(Hkv, -1, Dv)[:, :L]
        o = q.new_empty(T, Hq, Dv)
        for h in range(Hkv):  # one copy of the group's K and V per query head of the group
            kh = k[h].to(q.dtype).expand(G, L, Dk).unsqueeze(0).contiguous()
            vh = v[h].to(q.dtype)
            if Dv < Dk:
                vh = F.pad(vh, (0, Dk - Dv))
            vh = vh.expand(G, L, Dk).unsqueeze(0).contiguous()
            qh = q[r0:r1, h * G:(h + 1) * G].transpose(0, 1).unsqueeze(0)  # [1, G, T, Dk]
            oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(T, L))
            o[:, h * G:(h + 1) * G] = oh[0, ..., :Dv].transpose(0, 1)
        outs.append(o)
    return torch.cat(outs)
