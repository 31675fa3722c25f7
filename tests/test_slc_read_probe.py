"""scripts/slc_read_probe.py: each of its three modes must read exactly the pages it counts (NSEL
pseudo-random causal pages a query row and kv group, through the block table) and do with them
what it says, or the rates it prints (docs/benchmarks/prefill.md, forty-ninth session) would not
be the selected branch's bytes. CPU interpreter at a small shape, pages shuffled, against a float64
twin that draws the same pages."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from script_helpers import load_script

load_kernels()

P, DK1, DK2, DV, HKV, G, ROWS, NSEL = 16, 32, 16, 32, 2, 16, 40, 3


def _pages_drawn(r: int, h: int) -> list[int]:
    """The probe's block ids for row r and group h (its hash, in Python's exact integers)."""
    nb = r // P + 1
    return [((r * 2654435761 + s * 40503 + h * 7919) >> 7) % nb for s in range(NSEL)]


def _twin(mode, q, k, v, bt):
    out = torch.empty(ROWS, HKV * G, DV, dtype=torch.float64)
    for r in range(ROWS):
        for h in range(HKV):
            pages = [int(bt[b]) for b in _pages_drawn(r, h)]
            kk = torch.cat([k[p, h] for p in pages]).double()  # [NSEL·P, DK]
            vv = torch.cat([v[p, h] for p in pages]).double()
            heads = slice(h * G, (h + 1) * G)
            if mode == 0:
                per_page = [k[p, h, :, :DK1].double().sum(0) + v[p, h].double().sum(0) + k[p, h, :, DK1:].double().sum()
                            for p in pages]
                out[r, heads] = sum(per_page)[None, :]
                continue
            sc = q[r, heads].double() @ kk.T  # [G, NSEL·P]
            if mode == 1:  # the probe casts the scores to bf16 before p·v
                out[r, heads] = sc.to(torch.bfloat16).double() @ vv
            else:  # online softmax in base 2, as the probe's exp2
                p = torch.exp2(sc - sc.max(1, keepdim=True).values)
                out[r, heads] = (p @ vv) / p.sum(1, keepdim=True)
    return out


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_probe_reads_the_pages_it_counts(mode):
    m = load_script("slc_read_probe")
    torch.manual_seed(0)
    n_pages = ROWS // P + 1
    k = torch.randn(n_pages, HKV, P, DK1 + DK2, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(n_pages, HKV, P, DV, device=DEVICE).to(torch.bfloat16)
    bt = torch.randperm(n_pages, device=DEVICE).to(torch.int32)  # shuffled: a wrong page sums otherwise
    q = (torch.randn(ROWS, HKV * G, DK1 + DK2, device=DEVICE) * 0.2).to(torch.bfloat16)
    out = torch.zeros(ROWS, HKV * G, DV, device=DEVICE, dtype=torch.float32)
    m._pages[(ROWS, HKV)](q, k, v, bt, out, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          NSEL=NSEL, MODE=mode, P=P, DK1=DK1, DK2=DK2, DV=DV, G=G, HG=HKV * G,
                          PREC="tf32", UPCAST=DEVICE == "cpu")
    want = _twin(mode, q.cpu(), k.cpu(), v.cpu(), bt.cpu())
    err = ((out.double().cpu() - want).norm() / want.norm()).item()
    assert err < 1e-2, err
