"""One NSA prefill call (paper shape, one sequence) for Nsight Compute: warm-up, then one profiled call.

    ncu --clock-control none --profile-from-start off --set full --launch-skip 10 --launch-count 3 \
        -o prefill python3 scripts/ncu_prefill.py --len 65536

The profiled call is bracketed by cudaProfilerStart/Stop, so `--profile-from-start off` leaves the
warm-up (compiles) out. At 64k the launcher runs the packing kernel, then four 16k-row slices of
three kernels each (_cmp, _win, _slc; with `--config slc_topn=0` four: _topn before _slc, and
`--launch-skip 13 --launch-count 4`); `--launch-skip 10 --launch-count 3` keeps the last slice,
whose queries see the most summaries. Run from the repo root with `kernels/` importable as `nsa_kernels`
(scripts/device_env.sh).
"""

import argparse

import torch

from nsa_kernels.bench_prefill import PAPER, make_inputs, nsa_call, parse_config

ap = argparse.ArgumentParser()
ap.add_argument("--len", type=int, default=65536)
ap.add_argument("--config", default="", help="PrefillConfig fields, e.g. warps_slc=4")
a = ap.parse_args()
q, gates, layer, bt = make_inputs(a.len)
run = nsa_call(q, gates, layer, bt, a.len, a.len, PAPER, parse_config(a.config))
run()  # compile
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
run()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
