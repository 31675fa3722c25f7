"""The RoPE kernel (kernels/rope.py) equals the Rope class's PyTorch rotation and the float64 formula.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest before any kernel import)."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from nsa_serve.model.nsa_model import Rope

load_kernels()
from nsa_kernels.rope import rope_rotate  # noqa: E402  (after the interpreter is set up)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
POSITIONS = [0, 1, 5, 63, 64, 4095, 65535, 131071]


def _formula(x, positions, theta=10000.0):
    """Float64 rotate-half: (x₁ cos − x₂ sin, x₂ cos + x₁ sin) at angle pos · θ^(−2i/D)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.tensor(positions, dtype=torch.float64)[:, None] * inv
    c, s = ang.cos()[:, None, :].to(x.device), ang.sin()[:, None, :].to(x.device)
    x1, x2 = x.double()[..., : D // 2], x.double()[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def check(H, D, dtype, tol, positions=POSITIONS, device=DEVICE, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rope = Rope(torch.tensor(positions), D, 10000.0, dtype, torch.device(device))
    T = len(positions)
    if strided:  # a view whose token stride is not H·D (q and k sliced from one projection)
        x = torch.randn(T, H + 3, D, generator=gen).to(device, dtype)[:, 1:H + 1]
    else:
        x = torch.randn(T, H, D, generator=gen).to(device, dtype)
    got = rope_rotate(x, rope.cos, rope.sin)
    assert got.dtype == dtype and got.shape == x.shape
    want = _formula(x.cpu(), positions).to(device)
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    # Against the PyTorch ops it replaces: within one rounding of x's dtype.
    twin = rope.rotate_reference(x)
    assert torch.allclose(got.double(), twin.double(), rtol=tol, atol=tol * want.abs().max().item())
    return got, twin


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("H,D", [(1, 24), (4, 16), (5, 24), (64, 192), (3, 6)])
def test_rope_kernel_equals_formula_and_twin(H, D, dtype, tol):
    check(H, D, dtype, tol)


def test_rope_kernel_strided_tokens_and_empty():
    check(4, 24, torch.float32, 1e-5, strided=True)
    rope = Rope(torch.tensor([], dtype=torch.long), 8, 10000.0, torch.float32, torch.device(DEVICE))
    assert rope_rotate(torch.zeros(0, 2, 8, device=DEVICE), rope.cos, rope.sin).shape == (0, 2, 8)


def test_rope_kernel_refuses_what_it_cannot_do():
    rope = Rope(torch.tensor([3]), 8, 10000.0, torch.float32, torch.device(DEVICE))
    x = torch.zeros(1, 2, 16, device=DEVICE)[..., ::2]  # last dim not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        rope_rotate(x, rope.cos, rope.sin)
    with pytest.raises(ValueError, match="float32 tables"):
        rope_rotate(torch.zeros(1, 2, 8, device=DEVICE), rope.cos.double(), rope.sin.double())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H", [64, 4])
def test_gpu_rope_paper_shape_and_dispatch(H):
    # Real shapes on the GPU; Rope dispatches to the kernel on CUDA without autograd and keeps the
    # PyTorch ops (with a backward) when x requires grad.
    positions = list(range(0, 8192, 37))
    got, twin = check(H, 192, torch.bfloat16, 1e-2, positions=positions, device="cuda")
    rope = Rope(torch.tensor(positions), 192, 10000.0, torch.bfloat16, torch.device("cuda"))
    x = torch.randn(len(positions), H, 192, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(rope(x), rope_rotate(x, rope.cos, rope.sin))
    xg = x.clone().requires_grad_(True)
    y = rope(xg)
    assert y.grad_fn is not None and torch.equal(y.detach(), rope.rotate_reference(x))
    with torch.no_grad():
        assert torch.equal(rope(xg), rope_rotate(x, rope.cos, rope.sin))
