"""The RoPE kernel (kernels/rope.py) equals the Rope class's PyTorch rotation and the float64 formula.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest before any kernel import)."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from nsa_serve.model.nsa_model import Rope

load_kernels()
from nsa_kernels.cache_write import write_kv_pair  # noqa: E402  (after the interpreter is set up)
from nsa_kernels.rope import rope_rotate, rope_rotate_and_sigmoid, rope_rotate_sigmoid_write  # noqa: E402

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,D,NG", [(4, 24, 12), (5, 24, 15), (3, 6, 1)])
def test_rope_and_sigmoid_in_one_launch(H, D, NG, dtype):
    # The gates' logits as the model has them: a strided slice of one projection's output, beside
    # the q/k columns the launch rotates. The rotation is rope_rotate's bit for bit; the sigmoid is
    # torch's within one rounding of the dtype (float32 math, rounded once), and saturates cleanly.
    gen = torch.Generator().manual_seed(3)
    T = len(POSITIONS)
    rope = Rope(torch.tensor(POSITIONS), D, 10000.0, dtype, torch.device(DEVICE))
    y = (torch.randn(T, H * D + 7 + NG, generator=gen) * 4).to(DEVICE, dtype)
    y[0, -NG:] = torch.tensor([-200.0, 200.0] * NG, dtype=dtype)[:NG].to(DEVICE)  # far into both tails
    x, g = y[:, :H * D].view(T, H, D), y[:, -NG:]
    rot, sig = rope_rotate_and_sigmoid(x, rope.cos, rope.sin, g)
    assert torch.equal(rot, rope_rotate(x, rope.cos, rope.sin))
    assert sig.shape == (T, NG) and sig.dtype == dtype and sig.is_contiguous()
    want = torch.sigmoid(g.double())
    eps = torch.finfo(dtype).eps
    assert (sig.double() - want).abs().max().item() <= eps
    assert sig[0, 0].item() == 0.0 and (NG == 1 or sig[0, 1].item() == 1.0)
    assert torch.allclose(sig.double(), torch.sigmoid(g).double(), rtol=0, atol=eps)


def test_rope_and_sigmoid_empty_and_refusals():
    rope = Rope(torch.tensor([], dtype=torch.long), 8, 10000.0, torch.float32, torch.device(DEVICE))
    rot, sig = rope_rotate_and_sigmoid(torch.zeros(0, 2, 8, device=DEVICE), rope.cos, rope.sin,
                                       torch.zeros(0, 6, device=DEVICE))
    assert rot.shape == (0, 2, 8) and sig.shape == (0, 6)
    rope = Rope(torch.tensor([3, 4]), 8, 10000.0, torch.float32, torch.device(DEVICE))
    x = torch.zeros(2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="gate logits"):
        rope_rotate_and_sigmoid(x, rope.cos, rope.sin, torch.zeros(2, 6, device=DEVICE)[:, ::2])
    with pytest.raises(ValueError, match="gate logits"):
        rope_rotate_and_sigmoid(x, rope.cos, rope.sin, torch.zeros(3, 6, device=DEVICE))


def _write_case(Hq, Hkv, D, Dv, dtype, slots, pages=5, R=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    T = len(slots)
    positions = POSITIONS[:T]
    rope = Rope(torch.tensor(positions), D, 10000.0, dtype, torch.device(DEVICE))
    # As the fused projection lays them out: q and key heads, then the values, then the gate logits.
    y = torch.randn(T, (Hq + Hkv) * D + Hkv * Dv + 3 * Hq, generator=gen).to(DEVICE, dtype)
    x = y[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
    v = y[:, (Hq + Hkv) * D:(Hq + Hkv) * D + Hkv * Dv].view(T, Hkv, Dv)
    g = y[:, (Hq + Hkv) * D + Hkv * Dv:]
    kc = torch.randn(pages, Hkv, R, D, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(pages, Hkv, R, Dv, generator=gen).to(DEVICE, dtype)
    return rope, x, v, g, kc, vc, torch.tensor(slots, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,Dv", [(4, 2, 24, 16), (5, 1, 24, 12), (16, 4, 48, 32), (3, 3, 6, 10)])
def test_rope_sigmoid_and_kv_write_in_one_launch(Hq, Hkv, D, Dv, dtype):
    # The engine's decode step: the rotation, the gates' sigmoid and the token's K/V into its page
    # slot in one launch. Rotation and sigmoid are rope_rotate_and_sigmoid's bit for bit; both
    # caches end exactly as write_kv_pair of the rotated keys and the values leaves them, including
    # the slots it must not touch: shuffled pages, a slot on every row of a page, and negative
    # slots (padding rows) that write nothing.
    slots = [13, 2, -1, 7, 19, 0, -1, 8]
    rope, x, v, g, kc, vc, sl = _write_case(Hq, Hkv, D, Dv, dtype, slots)
    kc2, vc2 = kc.clone(), vc.clone()
    rot, sig = rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g, kc, vc, v, sl)
    want_rot, want_sig = rope_rotate_and_sigmoid(x, rope.cos, rope.sin, g)
    assert torch.equal(rot, want_rot) and torch.equal(sig, want_sig)
    write_kv_pair(kc2, vc2, want_rot[:, Hq:], v, sl)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert not torch.equal(kc[3, :, 3], want_rot[1, Hq:])  # slot 15 (page 3, row 3) was not written


def test_rope_sigmoid_write_refusals_and_empty():
    rope, x, v, g, kc, vc, sl = _write_case(4, 2, 8, 6, torch.float32, [1, 2, 3])
    with pytest.raises(ValueError, match="slots"):
        rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g, kc, vc, v, sl[:2])
    with pytest.raises(ValueError, match="v "):
        rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g, kc, vc, v[:, :1], sl)
    with pytest.raises(ValueError, match="caches"):
        rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g, kc, vc[:, :1], v, sl)
    with pytest.raises(ValueError, match="x "):
        rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g, kc[..., :4], vc, v, sl)
    with pytest.raises(ValueError, match="gate logits"):
        rope_rotate_sigmoid_write(x, rope.cos, rope.sin, g[:2], kc, vc, v, sl)
    kc0, vc0 = kc.clone(), vc.clone()
    rot, sig = rope_rotate_sigmoid_write(x[:0], rope.cos[:0], rope.sin[:0], g[:0], kc, vc, v[:0], sl[:0])
    assert rot.shape == (0, 6, 8) and sig.shape == (0, 12)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


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


@pytest.mark.gpu
@gpu
def test_gpu_rope_and_sigmoid_dispatch():
    # Rope.rotate_and_sigmoid takes the one-launch kernel on CUDA without autograd (the model's
    # decode and prefill), and the two PyTorch ops when x requires grad.
    positions = list(range(0, 4096, 17))
    T, H, D = len(positions), 68, 192
    rope = Rope(torch.tensor(positions), D, 10000.0, torch.bfloat16, torch.device("cuda"))
    y = torch.randn(T, H * D + 192, device="cuda", dtype=torch.bfloat16)
    x, g = y[:, :H * D].view(T, H, D), y[:, H * D:]
    rot, sig = rope.rotate_and_sigmoid(x, g)
    assert torch.equal(rot, rope_rotate(x, rope.cos, rope.sin))
    assert (sig.double() - torch.sigmoid(g.double())).abs().max().item() <= torch.finfo(torch.bfloat16).eps
    xg = x.clone().requires_grad_(True)
    rot2, sig2 = rope.rotate_and_sigmoid(xg, g)
    assert rot2.grad_fn is not None and torch.equal(sig2, torch.sigmoid(g))


@pytest.mark.gpu
@gpu
def test_gpu_project_and_gate_writes_kv_in_the_rope_launch():
    # The engine's path on the GPU: with fused projections and shared K/V, project_and_gate's
    # `write` stores the token's K/V in the RoPE launch (write_pair is not called); the caches and
    # outputs equal those of the same call without `write` followed by write_kv_pair.
    from nsa_serve.model import NSAModel, preset

    cfg = preset("paper-1b", num_layers=1, vocab_size=512)
    model = NSAModel(cfg).init_weights(seed=2).to("cuda", torch.bfloat16).eval()
    model.fuse_for_inference()
    attn = model.layers[0].attn
    T = 7
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([0, 5, 63, 64, 4095, 65535, 100000], device="cuda")
    kc = torch.randn(9, cfg.num_kv_heads, 64, cfg.head_dim_k, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(9, cfg.num_kv_heads, 64, cfg.head_dim_v, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([5, 70, -1, 130, 575, 64, 3], device="cuda")
    kc2, vc2 = kc.clone(), vc.clone()
    calls = []
    with torch.no_grad():
        q, kv, g = attn.project_and_gate(x, pos, write=(kc, vc, slots, lambda *a: calls.append(a)))
        q2, kv2, g2 = attn.project_and_gate(x, pos)
        write_kv_pair(kc2, vc2, *kv2["slc"], slots)
    assert not calls
    assert torch.equal(q, q2) and torch.equal(g, g2) and torch.equal(kv["slc"][0], kv2["slc"][0])
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
