"""How far φ's bf16 results are from float64: the decode kernel `phi_write_pair`, its PyTorch twin
and the model's φ modules, against the φ modules in float64 on the same (bf16-valued) weights and
blocks. Max |error| / max |φ(x)| per summary, worst over the rows, for φ_K and φ_V.

    python3 scripts/phi_accuracy_probe.py            # CUDA if present, else the CPU interpreter

Why: on CPU the kernel looked 1.5–2× less accurate than its twin (5.8e-3–9.7e-3 against
3.9e-3–6.4e-3). The Triton 3.9 interpreter rounds float32 → bfloat16 casts toward zero (its
`_convert_float` truncates the mantissa), where the GPU and torch round to nearest, and the kernel
casts its hidden activation and its output. On the H200 the kernel was as accurate as the twin or
more (it keeps the hidden activation in float32 until the second product): docs/benchmarks/engine.md,
thirty-fourth session.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from nsa_kernels.phi_decode import phi_write_pair, phi_write_pair_reference  # noqa: E402
from nsa_serve.model.config import preset  # noqa: E402
from nsa_serve.model.nsa_model import NSAAttention  # noqa: E402


def errors(seed: int, dk: int, dv: int, lb: int, H: int, N: int, device: str) -> list[tuple[float, float, float]]:
    """[(kernel, twin, modules)] relative errors for φ_K and φ_V (mlp φ, random bf16 weights with a
    position embedding, random blocks in shuffled cache slots)."""
    torch.manual_seed(seed)
    attn = NSAAttention(preset("tiny", phi="mlp", head_dim_k=dk, head_dim_v=dv, cmp_block=lb, cmp_stride=lb // 2,
                               select_block=max(16, lb)))
    with torch.no_grad():
        attn.phi_k.pos.normal_()
    attn = attn.to(device, torch.bfloat16)
    attn.fuse_phi()
    ref = copy.deepcopy(attn).double()
    gen = torch.Generator().manual_seed(seed + 1)
    pages, R, E = 2 * N + 3, 16, 4
    k = torch.randn(pages, H, R, dk, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(pages, H, R, dv, generator=gen).to(device, torch.bfloat16)
    slots = torch.randperm(pages * R, generator=gen)[:N * lb].view(N, lb).to(device)
    entries = torch.randperm(pages * E, generator=gen)[:N].to(device)
    kc = torch.zeros(pages, H, E, dk, dtype=torch.bfloat16, device=device)
    vc = torch.zeros(pages, H, E, dv, dtype=torch.bfloat16, device=device)
    tk, tv = kc.clone(), vc.clone()
    phi_write_pair(k, v, slots, kc, vc, entries, *attn.phi_pair_weights())
    phi_write_pair_reference(k, v, slots, tk, tv, entries, *attn.phi_pair_weights())
    out = []
    for cache, got, twin, f64, mod in ((k, kc, tk, ref.phi_k, attn.phi_k), (v, vc, tv, ref.phi_v, attn.phi_v)):
        blocks = cache[slots // R, :, slots % R].permute(0, 2, 1, 3)  # [N, H, l, D]
        want = f64(blocks.double())
        scale = want.abs().amax(dim=-1, keepdim=True)

        def e(x):
            return ((x.double() - want).abs() / scale).amax().item()

        at = (entries // E, slice(None), entries % E)
        out.append((e(got[at]), e(twin[at]), e(mod(blocks))))
    return out


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}; max |error| / max |φ| against float64 (kernel / twin / φ modules)")
    print("| shape | seed | φ_K kernel | φ_K twin | φ_K modules | φ_V kernel | φ_V twin | φ_V modules |")
    print("|---|---|---|---|---|---|---|---|")
    shapes = [("dk 32, dv 32, l 8, 2 heads", dict(dk=32, dv=32, lb=8, H=2, N=6))]
    if device == "cuda":
        shapes.append(("paper: dk 192, dv 128, l 32, 4 heads", dict(dk=192, dv=128, lb=32, H=4, N=16)))
    for name, kw in shapes:
        for seed in range(3):
            (a, b, c), (d, e_, f) = errors(seed, device=device, **kw)
            print(f"| {name} | {seed} | {a:.2e} | {b:.2e} | {c:.2e} | {d:.2e} | {e_:.2e} | {f:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
