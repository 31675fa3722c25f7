"""Nsight Compute target: one `phi_write_pair` call (paper-1b shape, bf16) at N sequences, after
warm-up, between cudaProfilerStart/Stop so `ncu --profile-from-start off` sees exactly its two
kernels. Run on a GPU machine with scripts/device_env.sh sourced:

    ncu --profile-from-start off --set full -o /tmp/phi python3 scripts/phi_ncu.py --rows 16
"""

import argparse

import torch

from nsa_kernels.phi_decode import phi_write_pair
from nsa_serve.model.config import preset
from nsa_serve.model.nsa_model import NSAAttention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16, help="sequences (4 kv heads each), all writing")
    ap.add_argument("--splits", type=int, default=None, help="default: phi_write_pair's")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = preset("paper-1b")
    torch.manual_seed(0)
    m = NSAAttention(cfg).to(dev, dt)
    with torch.no_grad():
        for p in (*m.phi_k.parameters(), *m.phi_v.parameters()):
            p.normal_(std=p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0)
    m.fuse_phi()
    w = m.phi_pair_weights()
    H, Dk, Dv, lb, P, E = cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.cmp_block, 64, 4
    pages = 4096
    k = torch.randn(pages, H, P, Dk, device=dev, dtype=dt)
    v = torch.randn(pages, H, P, Dv, device=dev, dtype=dt)
    kc = torch.zeros(pages, H, E, Dk, device=dev, dtype=dt)
    vc = torch.zeros(pages, H, E, Dv, device=dev, dtype=dt)
    N = a.rows
    slots = torch.randint(0, pages * P, (N, lb), device=dev)
    entries = torch.randperm(pages * E, device=dev)[:N]
    for _ in range(3):
        phi_write_pair(k, v, slots, kc, vc, entries, *w, splits=a.splits)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    flush.zero_()  # the weights leave the L2, as in a decode step that reads 16 layers
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    phi_write_pair(k, v, slots, kc, vc, entries, *w, splits=a.splits)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
