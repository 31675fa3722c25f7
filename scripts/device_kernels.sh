#!/usr/bin/env bash
# The kernels' GPU acceptance run in one device call (issues: decode ≥ 8× SDPA at 64k batch 16, prefill
# ≥ 5× at 64k): the device's own register report, the real-shape GPU tests, the decode table and
# profile, the prefill table. Run from the repo root on a GPU machine; everything lands in ${OUT:-.}.
# STEPS picks a subset (default: all but compare, timeline, decode_read and gluon_probe): compile
# tests decode profile prefill compare timeline decode_read gluon_probe. compare = the 64k launch
# variants and staged modes (bench_decode --compare); decode_read = the paper-shape decode table with
# the L2 emptied by reads (bench_decode --flush read; decode.md, fifteenth round); gluon_probe = one
# compressed sweep in Gluon against the Triton loop (scripts/gluon_cmp_probe.py; prefill.md,
# twenty-fifth session).
# Each step has its own time limit so one slow step cannot eat the call. The default steps can take
# longer than one 600 s device call (tests alone up to ~9 minutes): give the tests a call of their own.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
STEPS=${STEPS:-compile tests decode profile prefill}
step() { [[ " $STEPS " == *" $1 "* ]]; }
if step compile; then  # registers / spills as the device's Triton compiles them, sm_80 and sm_90
  timeout 120 python3 -m nsa_kernels.compile_check --shape paper,d128 --dtype bf16 2>&1 | tee "$OUT/compile.txt"
fi
if step tests; then  # decode's 38 GPU tests outgrew a shared 300 s (2026-12-03: 36 done in 320 s)
  timeout 360 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_decode.py 2>&1 \
    | tee "$OUT/gpu_tests.txt"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_prefill.py 2>&1 \
    | tee "$OUT/gpu_tests_prefill.txt"
fi
if step decode; then
  timeout 150 python3 -m nsa_kernels.bench_decode --shape paper --ctx 65536 --ctx 131072 --ctx 32768 2>&1 \
    | tee "$OUT/decode.txt"
  timeout 60 python3 -m nsa_kernels.bench_decode --shape d128 --ctx 65536 2>&1 | tee "$OUT/decode_d128.txt"
fi
if step decode_read; then
  timeout 170 python3 -m nsa_kernels.bench_decode --flush read --shape paper --ctx 65536 --ctx 131072 \
    --ctx 32768 2>&1 | tee "$OUT/decode_read.txt"
fi
if step profile; then  # per-kernel times without PDL: a PDL kernel's span includes its early wait
  NSA_PDL=0 timeout 60 python3 -m nsa_kernels.bench_decode --profile 2>&1 | tee "$OUT/decode_profile.txt"
fi
if step compare; then
  timeout 240 python3 -m nsa_kernels.bench_decode --compare 2>&1 | tee "$OUT/decode_compare.txt"
fi
if step timeline; then  # in-graph program timeline of the decode kernels (docs/benchmarks/decode.md, eighth round)
  timeout 150 python3 scripts/decode_timeline.py --batch 1 --batch 16 --topn sort --topn cand 2>&1 \
    | tee "$OUT/timeline.txt"
fi
if step gluon_probe; then
  timeout 200 python3 scripts/gluon_cmp_probe.py 2>&1 | tee "$OUT/gluon_probe.txt"
fi
if step prefill; then
  timeout 120 python3 -m nsa_kernels.bench_prefill --lens 32768,65536 2>&1 | tee "$OUT/prefill.txt"
fi
