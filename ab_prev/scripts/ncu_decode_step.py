"""One NSA decode step (paper shape) for Nsight Compute: warm-up, then one call of each kernel.

    ncu --clock-control none -k regex:_cmp_tile|_attend|_score -c 3 --section SpeedOfLight \
        python3 scripts/ncu_decode_step.py --batch 16 --ctx 65536

Run from the repo root with `kernels/` importable as `nsa_kernels` (scripts/device_env.sh).
"""

import argparse

import torch

from nsa_kernels.bench_decode import PAPER_P, SHAPES, make_inputs
from nsa_kernels.nsa_decode import nsa_decode

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--ctx", type=int, default=65536)
a = ap.parse_args()
q, gates, layer, tables, seq_lens = make_inputs(a.batch, a.ctx, **SHAPES["paper"], p=PAPER_P)
nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P)  # compile (ncu's -c counts launches from here on)
torch.cuda.synchronize()
nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P)
torch.cuda.synchronize()
