"""Residual add + RMSNorm as one Triton kernel: h' = h + δ (in h's dtype), y = rms_norm(h')·w.

A decoder layer adds the attention output to the residual stream and normalises the sum for the MLP,
then adds the MLP output and normalises for the next layer: two adds and two norms a layer, four
launches where this is two (and the model's final norm takes the last add). The PyTorch twin is
`h + δ` followed by `F.rms_norm` (`nsa_serve.model.nsa_model.add_rms_norm`, which the tests compare
this with): the sum is rounded to h's dtype first, as the separate add would store it, and the
norm is computed in float32 from that rounded sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, hout_ptr, y_ptr, sh, sd, sho, sy, N, eps,
                         NP: tl.constexpr):
    """Program t: row t of h, δ → h' (row t of hout) and y."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NP)
    m = c < N
    s = (tl.load(h_ptr + t * sh + c, mask=m, other=0.0).to(tl.float32)
         + tl.load(d_ptr + t * sd + c, mask=m, other=0.0).to(tl.float32))
    s = s.to(hout_ptr.dtype.element_ty)  # the residual stream keeps h's dtype (as `h + δ` would)
    tl.store(hout_ptr + t * sho + c, s, mask=m)
    x = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * sy + c, (x * inv * w).to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """h, δ [T, N] (rows with a contiguous last dim), weight [N] → (h + δ, rms_norm(h + δ)·weight),
    both new tensors in h's dtype."""
    if h.dim() != 2 or delta.shape != h.shape or weight.shape != (h.shape[1],):
        raise ValueError(f"add_rms_norm needs h, delta [T, N] and weight [N], got {tuple(h.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(weight.shape)}")
    if h.stride(-1) != 1 or delta.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("add_rms_norm needs a contiguous last dim")
    T, N = h.shape
    hout = torch.empty((T, N), dtype=h.dtype, device=h.device)
    y = torch.empty_like(hout)
    if T:
        NP = next_pow2(N)
        _add_rms_norm_kernel[(T,)](h, delta, weight, hout, y, h.stride(0), delta.stride(0), hout.stride(0),
                                   y.stride(0), N, float(eps), NP=NP, num_warps=4 if NP <= 2048 else 8)
    return hout, y
