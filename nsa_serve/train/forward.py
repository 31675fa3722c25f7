"""The reference model's whole-sequence forward, with attention computed in query chunks that are
recomputed in the backward pass (activation checkpointing).

Same modules, same math as `NSAModel.forward` (tests check logits and gradients match): projections,
φ compression, gates and the MLP run as there; only the call to the reference `nsa_attention` is split
by query rows. Why: the reference materialises [heads, T, S] score and mask tensors for each branch and
autograd keeps several of them per layer, which grows as T² (measured in docs/training.md); a chunk of
C queries needs only [heads, C, S], and checkpointing frees it after the chunk's forward. A query
chunk [a, b) sees keys < b only, so it gets K/V[:b] and the summaries complete within b tokens.

`compile_attention()` swaps in a torch.compile'd copy of the per-chunk attention (same function; on
CUDA inductor fuses the reference's chain of masked-softmax passes over [heads, C, S], which is where
the time goes). Optional: tried and timed by `profile_step --compile` before a run relies on it.

`attn_fp32` runs the attention math in float32 even under bf16 autocast: the selection branch's
top-n depends on the compressed scores, and the serving kernels accumulate them in fp32 too.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from nsa_kernels.reference import nsa_attention, num_compressed

from nsa_serve.model.nsa_model import NSAModel


def _attend(q, positions, kc, vc, ks, vs, kw, vw, gates, sparsity, fp32: bool):
    if not fp32:
        return nsa_attention(q, positions, kc, vc, ks, vs, kw, vw, gates, sparsity)
    ctx = torch.autocast(q.device.type, enabled=False) if torch.is_autocast_enabled(q.device.type) \
        else contextlib.nullcontext()
    with ctx:
        f = [t.float() for t in (q, kc, vc, ks, vs, kw, vw, gates)]
        out = nsa_attention(f[0], positions, *f[1:], sparsity)
    return out


_attend_impl = _attend


def compile_attention() -> None:
    """Use torch.compile for the attention chunks (dynamic shapes: every chunk has its own key count)."""
    global _attend_impl
    _attend_impl = torch.compile(_attend, dynamic=True)


def attention_block(attn, x: torch.Tensor, positions: torch.Tensor, q_chunk: int | None,
                    attn_fp32: bool = False) -> torch.Tensor:
    c = attn.cfg
    T = x.shape[0]
    q, kv = attn.project(x, positions)
    n = num_compressed(T, c.cmp_block, c.cmp_stride)
    kc, vc = attn.compress(*kv["cmp"], 0, n) if n else attn._empty_summaries(x)
    gates = attn.gate(x)
    (ks, vs), (kw, vw) = kv["slc"], kv["win"]
    if q_chunk is None or T <= q_chunk:
        o = _attend_impl(q, positions, kc, vc, ks, vs, kw, vw, gates, c.sparsity, attn_fp32)
    else:
        outs = []
        for a in range(0, T, q_chunk):
            b = min(T, a + q_chunk)
            nc = num_compressed(b, c.cmp_block, c.cmp_stride)
            args = (q[a:b], positions[a:b], kc[:nc], vc[:nc], ks[:b], vs[:b], kw[:b], vw[:b], gates[a:b],
                    c.sparsity, attn_fp32)
            if torch.is_grad_enabled():
                outs.append(checkpoint(_attend_impl, *args, use_reentrant=False))
            else:
                outs.append(_attend_impl(*args))
        o = torch.cat(outs)
    return attn.output(o.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else o)


def train_forward(model: NSAModel, tokens: torch.Tensor, q_chunk: int | None = None,
                  attn_fp32: bool = False) -> torch.Tensor:
    """tokens [T] → logits [T, vocab], as `model.forward(tokens)`."""
    positions = torch.arange(tokens.shape[0], device=tokens.device)
    h = model.embed(tokens)
    for layer in model.layers:
        h = h + attention_block(layer.attn, layer.attn_norm(h), positions, q_chunk, attn_fp32)
        h = h + layer.mlp(layer.mlp_norm(h))
    return model.logits(h)
