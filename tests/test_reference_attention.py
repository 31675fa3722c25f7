"""The reference NSA attention equals a naive per-token float64 implementation (tests/naive_nsa.py)."""

import pytest
import torch

from nsa_kernels.reference import SparsityParams, compress_blocks, nsa_attention, num_compressed
from nsa_serve.model.nsa_model import Compressor
from naive_nsa import naive_nsa

SCALED = dict(l=8, d=4, lp=16, n=4, w=32)
PAPER = dict(l=32, d=16, lp=64, n=16, w=512)


def phi_params(module: Compressor) -> dict:
    if module.variant == "mean":
        return {}
    return {"pos": module.pos, "proj": module.proj.weight,
            "out": module.out.weight if module.variant == "mlp" else None}


def run_case(hp, phi, shared, group, length, seed, n_kv=None):
    gen = torch.Generator().manual_seed(seed)
    Hkv = n_kv or (1 if group >= 16 else 2)
    Hq, Dk, Dv = Hkv * group, 12, 8
    f64 = dict(dtype=torch.float64)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, **f64)

    q = rnd(length, Hq, Dk)
    branches = ["cmp"] if shared else ["cmp", "slc", "win"]
    raw = {b: (rnd(length, Hkv, Dk), rnd(length, Hkv, Dv)) for b in branches}
    kv = {b: raw["cmp"] if shared else raw[b] for b in ("cmp", "slc", "win")}
    gates = torch.rand(length, Hq, 3, generator=gen, **f64)
    torch.manual_seed(seed)
    phi_k = Compressor(phi, hp["l"], Dk, use_pos=True).double()
    phi_v = Compressor(phi, hp["l"], Dv, use_pos=False).double()
    if phi != "mean":  # non-zero position embedding so it matters
        with torch.no_grad():
            phi_k.pos.normal_()

    p = SparsityParams(block=hp["l"], stride=hp["d"], select_block=hp["lp"], num_select=hp["n"], window=hp["w"])
    with torch.no_grad():
        kc = phi_k(compress_blocks(kv["cmp"][0], p.block, p.stride))
        vc = phi_v(compress_blocks(kv["cmp"][1], p.block, p.stride))
        assert kc.shape[0] == num_compressed(length, p.block, p.stride)
        ref, chosen = nsa_attention(q, torch.arange(length), kc, vc, *kv["slc"], *kv["win"], gates, p,
                                    return_selection=True)
        naive, naive_chosen = naive_nsa(q, kv, gates, phi, phi_params(phi_k), phi_params(phi_v),
                                        hp["l"], hp["d"], hp["lp"], hp["n"], hp["w"])
    err = (ref - naive).norm() / naive.norm()
    assert err < 1e-6, f"relative error {err:.2e}"
    for (t, g), blocks in naive_chosen.items():
        got = torch.nonzero(chosen[g, t]).flatten().tolist()
        assert got == blocks, f"t={t} group={g}: reference chose {got}, naive {blocks}"


@pytest.mark.parametrize("phi", ["mlp", "linear", "mean"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_scaled_hyperparameters(phi, shared, group):
    hp = SCALED
    for i, length in enumerate([1, hp["l"] - 1, hp["l"], hp["l"] + 1, 37, 93]):
        run_case(hp, phi, shared, group, length, seed=1000 * group + i)


@pytest.mark.parametrize("phi,shared,group", [("mlp", True, 4), ("linear", False, 16), ("mean", True, 1)])
def test_scaled_long_sequences(phi, shared, group):
    run_case(SCALED, phi, shared, group, 200, seed=7)
    run_case(SCALED, phi, shared, group, 1000, seed=8, n_kv=1)


@pytest.mark.parametrize("phi,shared,group", [("mlp", False, 2), ("linear", True, 4), ("mean", False, 16)])
def test_paper_hyperparameters(phi, shared, group):
    hp = PAPER
    for i, length in enumerate([1, hp["l"] - 1, hp["l"], hp["l"] + 1, 200]):
        run_case(hp, phi, shared, group, length, seed=50 + i, n_kv=1)


@pytest.mark.slow
@pytest.mark.parametrize("length,phi,shared", [(1000, "linear", False), (1100, "mlp", True)])
def test_paper_hyperparameters_long(length, phi, shared):
    # 1000 tokens: 16 blocks = n, all selected; 1100: 18 blocks > n, so top-n really drops blocks.
    # The window (512) is shorter than both.
    run_case(PAPER, phi, shared, 4, length, seed=99, n_kv=1)
