"""Training forwards of the reference model's modules.

`train_forward_batch` (what the trainer runs): a batch of equal-length sequences, attention through
`nsa_kernels.nsa_sdpa` (each NSA branch one fused attention call), in query chunks when its masks
would be large; optionally the selection supervision `selection_aux_loss`. Below it, the first
formulation, kept as `--attention reference`:

`train_forward`: one sequence's whole-sequence forward, with attention computed in query chunks that
are recomputed in the backward pass (activation checkpointing).

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

from nsa_kernels.nsa_sdpa import nsa_attention_batched
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


# -- batched training forward on fused attention (what the trainer runs) ---------------------------

# Per query chunk: the selected branch's [B, Hq, C, S] mask (1 B as bool, 2 B as the bf16 bias the
# fused kernel reads). 2^30 keeps a 32k-token step of 2k or 4k sequences in one chunk (chunking costs a
# recompute and, at 16 chunks, made a 16k step launch-bound: 0.45 s/sequence, H100, 2026-11-25).
MASK_ELEMS = 2**30


def auto_q_chunk(batch: int, heads: int, seq_len: int, select_block: int) -> int | None:
    """Query rows per chunk so the selected branch's mask stays under MASK_ELEMS (None: no chunking)."""
    if batch * heads * seq_len * seq_len <= MASK_ELEMS:
        return None
    c = MASK_ELEMS // (batch * heads * seq_len)
    return max(select_block, c // select_block * select_block)


def _compress_batched(attn, k_raw: torch.Tensor, v_raw: torch.Tensor, n: int):
    """[B, T, Hkv, D] raw K/V → summaries of entries 0 … n−1, [B, n, Hkv, D] (as attn.compress)."""
    c = attn.cfg
    kb = k_raw.unfold(1, c.cmp_block, c.cmp_stride)[:, :n].transpose(-1, -2)  # [B, n, Hkv, l, D]
    vb = v_raw.unfold(1, c.cmp_block, c.cmp_stride)[:, :n].transpose(-1, -2)
    return attn.phi_k(kb), attn.phi_v(vb)


def selection_aux_loss(q: torch.Tensor, kc: torch.Tensor, target, p) -> torch.Tensor:
    """Retrieval supervision for the selection branch (`--select-aux-weight`; off by default).

    target = (seq [M], pos [M], block [M]): at query `pos` of sequence `seq` the answer needs the fact
    in selection block `block`. Returns the mean over targets and kv groups of −log(share of the
    group's selection score that falls on that block), computed like the selection itself
    (overlap-weighted compressed probabilities, summed over the group's heads) but differentiable.
    Why: top-n is discrete, so the only gradient that teaches a query to score the right block comes
    through the compressed branch's own output; at 16k a small model did not learn retrieval from that
    alone (docs/training.md). This points the compressed scores, and so the selection, at the block.
    """
    from nsa_kernels.reference import selection_weights

    seq, pos, block = target[:3]
    M, (_, N, Hkv, Dk) = seq.shape[0], kc.shape
    Hq = q.shape[2]
    qa = q[seq, pos].float().view(M, Hkv, Hq // Hkv, Dk)  # [M, Hkv, G, Dk]
    s = torch.einsum("mhgd,mnhd->mhgn", qa, kc[seq].float()) * Dk ** -0.5
    i = torch.arange(N, device=q.device)
    visible = (i.unsqueeze(0) * p.stride + p.block - 1) <= pos.unsqueeze(1)  # [M, N]
    prob = torch.softmax(s.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
    NB = int(block.max()) + 1
    W = selection_weights(N, NB, p.block, p.stride, p.select_block, dtype=prob.dtype, device=q.device)
    scores = torch.einsum("mhgn,nk->mhk", prob, W)  # [M, Hkv, NB]
    total = prob.sum(-1).sum(-1) * (p.block / p.stride)  # every entry's weights sum to l/d
    hit = scores.gather(-1, block.view(M, 1, 1).expand(M, Hkv, 1)).squeeze(-1)
    return -torch.log(hit / total + 1e-6).mean()


def batched_attention_block(attn, x: torch.Tensor, batch: int, positions: torch.Tensor,
                            q_chunk: int | None, aux_target=None, aux_out: list | None = None) -> torch.Tensor:
    """x [B·T, hidden] (B sequences of T tokens, row-major) → the attention block's output [B·T, hidden].
    With `aux_target`, the layer's `selection_aux_loss` is appended to `aux_out`."""
    c = attn.cfg
    B, T = batch, x.shape[0] // batch
    q, kv = attn.project(x, positions)
    q = q.view(B, T, c.num_heads, c.head_dim_k)
    kv = {b: (k.view(B, T, c.num_kv_heads, c.head_dim_k), v.view(B, T, c.num_kv_heads, c.head_dim_v))
          for b, (k, v) in kv.items()}
    n = num_compressed(T, c.cmp_block, c.cmp_stride)
    if n:
        kc, vc = _compress_batched(attn, *kv["cmp"], n)
    else:
        kc = x.new_zeros(B, 0, c.num_kv_heads, c.head_dim_k)
        vc = x.new_zeros(B, 0, c.num_kv_heads, c.head_dim_v)
    gates = attn.gate(x).view(B, T, c.num_heads, 3)
    if aux_target is not None and n:
        aux_out.append(selection_aux_loss(q, kc, aux_target, c.sparsity))
    (ks, vs), (kw, vw) = kv["slc"], kv["win"]
    if q_chunk is None or T <= q_chunk:
        o = nsa_attention_batched(q, 0, kc, vc, ks, vs, kw, vw, gates, c.sparsity)
    else:
        outs = []
        for a in range(0, T, q_chunk):
            b = min(T, a + q_chunk)
            nc = num_compressed(b, c.cmp_block, c.cmp_stride)
            args = (q[:, a:b], a, kc[:, :nc], vc[:, :nc], ks[:, :b], vs[:, :b], kw[:, :b], vw[:, :b],
                    gates[:, a:b], c.sparsity)
            if torch.is_grad_enabled():
                outs.append(checkpoint(nsa_attention_batched, *args, use_reentrant=False))
            else:
                outs.append(nsa_attention_batched(*args))
        o = torch.cat(outs, dim=1)
    return attn.output(o.reshape(B * T, c.num_heads, c.head_dim_v))


def train_forward_batch(model: NSAModel, tokens: torch.Tensor, q_chunk: int | None | str = "auto",
                        aux_target=None):
    """tokens [B, T] → logits [B, T, vocab]; row b equals `model.forward(tokens[b])`.
    With `aux_target` (see `selection_aux_loss`) returns (logits, the loss averaged over layers)."""
    B, T = tokens.shape
    c = model.cfg
    if q_chunk == "auto":
        q_chunk = auto_q_chunk(B, c.num_heads, T, c.select_block)
    positions = torch.arange(T, device=tokens.device).repeat(B)
    h = model.embed(tokens.reshape(-1))
    aux: list = []
    for layer in model.layers:
        h = h + batched_attention_block(layer.attn, layer.attn_norm(h), B, positions, q_chunk, aux_target, aux)
        h = h + layer.mlp(layer.mlp_norm(h))
    logits = model.logits(h).view(B, T, -1)
    if aux_target is None:
        return logits
    return logits, (torch.stack(aux).mean() if aux else logits.new_zeros((), dtype=torch.float32))
