"""scripts/cmp_read_probe.py: its two readers must read every summary byte exactly once, or the
rates it prints (docs/benchmarks/decode.md, fifteenth round) would not be the compressed pass's
bytes. CPU interpreter at a small shape; the pages of each sequence in a shuffled order."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from script_helpers import load_script

load_kernels()


def _probe():
    return load_script("cmp_read_probe")


@pytest.mark.parametrize("pages,nsplit", [(16, 2), (12, 3)])
def test_readers_sum_every_summary_once(pages, nsplit):
    m = _probe()
    torch.manual_seed(0)
    B, Hkv, E = 2, 4, 4
    kc = torch.randn(B * pages, Hkv, E, 192, device=DEVICE).to(torch.bfloat16)
    vc = torch.randn(B * pages, Hkv, E, 128, device=DEVICE).to(torch.bfloat16)
    # Each sequence owns its own pages, shuffled: a reader that skipped or repeated a page, a head
    # or an entry would get another total (the data are random normals, not zeros).
    bt = torch.randperm(B * pages, device=DEVICE).view(B, pages).to(torch.int32)
    want = (kc.double().sum() + vc.double().sum()).item()
    n_ent, BN = pages * E, 16
    out = torch.zeros(B * Hkv * nsplit * BN, device=DEVICE)
    m._per_head[(B * Hkv, nsplit)](kc, vc, bt, out, bt.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
                                   vc.stride(0), vc.stride(1), vc.stride(2), n_ent, Hkv, nsplit,
                                   DK0=128, DK1=64, DV=128, E=E, BN=BN, STAGES=3)
    rows = 32
    out2 = torch.zeros(B * nsplit * rows, device=DEVICE)
    m._all_heads[(B, nsplit)](kc, vc, bt, out2, bt.stride(0), kc.stride(0), kc.stride(2), vc.stride(0),
                              vc.stride(2), n_ent, nsplit, DK0=128, DK1=64, DV=128, HE=Hkv * E,
                              PPT=rows // (Hkv * E), E=E, STAGES=3)
    scale = (kc.double().abs().sum() + vc.double().abs().sum()).item()
    for got in (out.double().sum().item(), out2.double().sum().item()):
        assert abs(got - want) < 1e-5 * scale
