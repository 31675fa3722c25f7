"""The residual-add + RMSNorm kernel (kernels/add_rms_norm.py) equals its PyTorch twin (`h + δ`, then
the model's RMSNorm) and the float64 formula.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest before any kernel import)."""

import pytest
import torch

from kernels_interpret import DEVICE, assert_matches, load_kernels
from nsa_serve.model.nsa_model import RMSNorm, add_rms_norm, rms_norm_reference

load_kernels()
from nsa_kernels.add_rms_norm import add_rms_norm as kernel  # noqa: E402  (after the interpreter is set up)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(T, N, dtype, tol, device=DEVICE, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different scales (eps matters for the small one), a non-trivial weight.
    scale = torch.logspace(-4, 1.5, T).view(T, 1) if T else torch.ones(0, 1)
    h = (torch.randn(T, N, generator=gen) * scale).to(device, dtype)
    d = (torch.randn(T, N, generator=gen) * scale).to(device, dtype)
    if strided:  # rows of a wider tensor (a view, as a slice of a fused projection would be)
        h = torch.cat([h, torch.zeros(T, 5, device=device, dtype=dtype)], 1)[:, :N]
    norm = RMSNorm(N, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N, generator=gen))
    norm = norm.to(device, dtype)
    hs, y = kernel(h, d, norm.weight, norm.eps)
    assert hs.dtype == y.dtype == dtype and hs.shape == y.shape == (T, N)
    if device == "cuda" or dtype != torch.bfloat16:
        assert torch.equal(hs, h + d)  # the residual stream: exactly the separate add's result
    else:  # Triton's CPU interpreter truncates float32 → bfloat16 (CUDA rounds to nearest even)
        assert torch.allclose(hs.float(), (h + d).float(), rtol=2 ** -7, atol=0)
    with torch.no_grad():
        twin = norm(h + d)
    want = rms_norm_reference((h + d).double(), norm.weight.double(), 1e-5)
    if T:
        assert_matches(y, want, twin, tol)
    return hs, y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,N", [(1, 16), (5, 96), (3, 100), (7, 64)])
def test_add_rms_norm_kernel_equals_twin_and_formula(T, N, dtype, tol):
    check(T, N, dtype, tol)


def test_add_rms_norm_kernel_strided_rows_empty_and_refusals():
    check(4, 48, torch.float32, 1e-5, strided=True)
    check(0, 48, torch.float32, 1e-5)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(torch.zeros(2, 16, device=DEVICE)[:, ::2], torch.zeros(2, 8, device=DEVICE), w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        kernel(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)


def test_add_rms_norm_dispatch_keeps_the_pytorch_ops_off_cuda_and_under_autograd():
    # The model-level helper: the two PyTorch ops on CPU and whenever autograd is recording.
    norm = RMSNorm(16, 1e-6)
    h, d = torch.randn(3, 16), torch.randn(3, 16, requires_grad=True)
    hs, y = add_rms_norm(h, d, norm)
    assert y.grad_fn is not None
    assert torch.equal(hs, h + d) and torch.equal(y, norm(h + d))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 16, 8192])
def test_gpu_add_rms_norm_paper_1b_rows_and_dispatch(T):
    # paper-1b's hidden size on the GPU; the model-level helper takes the kernel on CUDA without
    # autograd and keeps the PyTorch ops when an input requires grad.
    check(T, 2048, torch.bfloat16, 1e-2, device="cuda")
    norm = RMSNorm(2048, 1e-6).to("cuda", torch.bfloat16)
    h = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = add_rms_norm(h, d, norm), kernel(h, d, norm.weight, norm.eps)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dg = d.clone().requires_grad_(True)
    hs, y = add_rms_norm(h, dg, norm)
    assert y.grad_fn is not None and torch.equal(hs.detach(), h + d)
