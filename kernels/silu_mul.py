"""SwiGLU's elementwise half as one Triton kernel: y = silu(g) · u for gu = [g | u] (rows [T, 2I]).

The MLP's gate and up projections come out of one GEMM (`MLP.forward_fused`) as the two halves of
each row; PyTorch then needs two launches (SiLU, then the product, with a rounded intermediate).
Here one launch reads each half once and computes silu(g)·u in float32, rounding once to the
output dtype. The PyTorch twin is `F.silu(g) * u` (`nsa_serve.model.nsa_model.silu_mul`, which the
tests compare this with, and the float64 formula).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns a program: 6 programs a row at paper-1b's intermediate size (5632)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, sx, sy, N, BLOCK: tl.constexpr):
    """Program (t, j): columns [j·BLOCK, (j+1)·BLOCK) of row t."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    g = tl.load(x_ptr + t * sx + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * sx + N + c, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + t * sy + c, y.to(y_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (rows with a contiguous last dim; gate first, up second) → silu(gate)·up [T, I]."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"silu_mul needs [T, 2I], got {tuple(gu.shape)}")
    if gu.stride(-1) != 1:
        raise ValueError("silu_mul needs a contiguous last dim")
    T, N = gu.shape[0], gu.shape[1] // 2
    y = torch.empty((T, N), dtype=gu.dtype, device=gu.device)
    if T and N:
        _silu_mul_kernel[(T, triton.cdiv(N, BLOCK))](gu, y, gu.stride(0), y.stride(0), N, BLOCK=BLOCK,
                                                      num_warps=4)
    return y
