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
import logging

import torch

from nsa_kernels.nsa_sdpa import paged_nsa_prefill_sdpa
from nsa_kernels.paged import PagedLayerCache, paged_nsa_attention_ref
from nsa_kernels.reference import SparsityParams

log = logging.getLogger(__name__)


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
        # Dense prompt chunks through torch's fused attention on GPU (`dense_prefill_sdpa`): the
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
    """Causal attention of the prompt-chunk rows of sequences lo … hi−1 over their pages: query t of
    a T-row chunk sees keys ≤ L − T + t. Same result as the reference's dense mode
    (tests/test_engine_attention.py).

    Two attention calls per chunk, merged by their log-sum-exps, because torch's fused kernels take
    a lower-right causal mask only through FlashAttention-2 with dk = dv (the paper shape's 192/128
    needed V padded and K/V copied per query head; measured in docs/benchmarks/engine.md):
      prefix  the chunk against the L − T cached keys before it, no mask. Each kv head's G query
              heads are folded into one long query ([Hkv, G·T, Dk]): no per-head K/V copies.
      self    the chunk against its own T keys, causal and square (a top-left mask is right),
              K/V expanded to the query heads (T rows only).
    """
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
        k = cache.k_cache[pages].transpose(0, 1).reshape(Hkv, -1, Dk)[:, :L].to(q.dtype)
        v = cache.v_cache[pages].transpose(0, 1).reshape(Hkv, -1, Dv)[:, :L].to(q.dtype)
        qb = q[r0:r1].transpose(0, 1)  # [Hq, T, Dk]
        ks = k[:, L - T:].repeat_interleave(G, 0)
        vs = v[:, L - T:].repeat_interleave(G, 0)
        o, lse = attention_lse(qb, ks, vs, causal=True)  # [Hq, T, Dv], [Hq, T]
        if L > T:
            qf = qb.reshape(Hkv, G * T, Dk)
            o1, lse1 = attention_lse(qf, k[:, :L - T], v[:, :L - T], causal=False)
            o = merge_by_lse(o, lse, o1.reshape(Hq, T, Dv), lse1.reshape(Hq, T))
        outs.append(o.to(q.dtype).transpose(0, 1))
    return torch.cat(outs)


def merge_by_lse(o1, lse1, o2, lse2):
    """Two attention outputs over disjoint key sets of the same rows, combined by their log-sum-exps
    (lse [..., rows], o [..., rows, D]); the result is in the lse's dtype."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1.to(m.dtype) * w1[..., None] + o2.to(m.dtype) * w2[..., None]) / (w1 + w2)[..., None]


# (device, dtype, dk, dv) for which torch's cuDNN attention raised: e.g. a GPU before sm_80, a
# cuDNN without fused attention, head dims it does not take. Those go to the memory-efficient
# kernel, which also takes dk ≠ dv and returns the log-sum-exp, at some speed cost.
_cudnn_refused: set[tuple] = set()


def _use_cudnn(key: tuple) -> bool:
    return key not in _cudnn_refused


def attention_lse(q, k, v, causal: bool):
    """softmax(q kᵀ / √dk) v and the rows' natural-log log-sum-exp, for q [H, Tq, Dk], k [H, Tk, Dk],
    v [H, Tk, Dv]; `causal`: a top-left (square) mask. Returns o [H, Tq, Dv] in q's dtype and lse
    [H, Tq] in float32 (float64 for float64 inputs). CUDA half types: torch's cuDNN attention (it
    takes dk ≠ dv and returns the log-sum-exp), or its memory-efficient kernel where cuDNN refuses
    the shape or the GPU; elsewhere plain math (the tests' float64 twin)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        key = (q.device, q.dtype, q.shape[-1], v.shape[-1])
        if _use_cudnn(key):
            try:
                out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, True, 0.0, causal)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                _cudnn_refused.add(key)
                log.warning("torch's cuDNN attention refused dense prompt chunks (%s, dk %d, dv %d: %s); "
                            "using the memory-efficient kernel", q.dtype, q.shape[-1], v.shape[-1],
                            str(e).splitlines()[0][:200])
            else:
                o, lse = out[0][0], out[1][0]
                return o, lse.reshape(o.shape[:-1]).float()
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, True, 0.0, causal)
        o, lse = out[0][0], out[1][0]
        return o, lse[:, :q.shape[1]].float()  # its lse rows are padded to a multiple of 32
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse.to(acc)
