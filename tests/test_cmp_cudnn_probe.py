"""scripts/cmp_cudnn_probe.py: the compressed branch's strided causal mask (query t sees summary i
when i·d + l − 1 ≤ t) written as ordinary causal attention per residue of t modulo d. The probe
times cuDNN on those views (docs/benchmarks/prefill.md, fiftieth session), so the views and the
way back to token order must give exactly the compressed branch's attention: checked here with
torch's CPU attention in float64 against a direct masked softmax, every query included."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels_interpret import load_kernels
from script_helpers import load_script

load_kernels()

D, LB, HQ, HKV, DK, DV = 16, 32, 8, 2, 24, 16


def _direct(q, kc, vc, scale):
    """Compressed attention by definition: [S, Hq, Dv], zero where no summary is visible."""
    S, G = q.shape[0], HQ // HKV
    out = torch.zeros(S, HQ, DV, dtype=torch.float64)
    for t in range(S):
        last = (t - LB + 1) // D  # the last visible summary (negative: none)
        if last < 0:
            continue
        for h in range(HQ):
            s = (q[t, h] @ kc[h // G, : last + 1].T) * scale
            out[t, h] = torch.softmax(s, 0) @ vc[h // G, : last + 1]
    return out


@pytest.mark.parametrize("S", [640, 1024])
def test_residue_attention_is_the_compressed_branch(S):
    m = load_script("cmp_cudnn_probe")
    torch.manual_seed(S)
    N = (S - LB) // D + 1
    q = torch.randn(S, HQ, DK, dtype=torch.float64)
    kc = torch.randn(HKV, N, DK, dtype=torch.float64)
    vc = torch.randn(HKV, N, DV, dtype=torch.float64)
    scale = 1 / math.sqrt(DK)
    q_main, q_last = m.residue_views(q, D, LB)
    assert q_main.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()  # views, not copies
    assert q_main.shape == (D - 1, HQ, S // D - 2, DK) and q_last.shape == (1, HQ, S // D - 1, DK)

    def attend(qq):
        B = qq.shape[0]
        return F.scaled_dot_product_attention(qq, kc[None].expand(B, -1, -1, -1), vc[None].expand(B, -1, -1, -1),
                                              is_causal=True, scale=scale, enable_gqa=True)

    got = m.residue_output(attend(q_main), attend(q_last), D)
    want = _direct(q, kc, vc, scale)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-12


def test_residue_views_refuse_other_shapes():
    m = load_script("cmp_cudnn_probe")
    with pytest.raises(ValueError):
        m.residue_views(torch.zeros(100, HQ, DK), D, LB)  # not a multiple of d
    with pytest.raises(ValueError):
        m.residue_views(torch.zeros(640, HQ, DK), D, 48)  # l = 3·d: three offsets
