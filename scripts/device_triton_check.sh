#!/usr/bin/env bash
# Every GPU test, then the 64k decode table, on the Triton packed by scripts/pack_triton.sh (default
# 3.9, torch 2.13's) instead of the device image's 3.6. On the development machine:
#   PYTHON=.venv/bin/python bash scripts/pack_triton.sh
# then through the device tool, from the repo root, carrying .cache:
#   bash scripts/device_triton_check.sh
# One file per step under ${OUT:-.}; each step has its own time limit (the tests took 313 + 24 + 128 + 16 s
# on Triton 3.6, first compiles included): more than one 600 s call holds, so STEPS picks a subset
# (default all: decode small prefill train engine bench); the table runs only while the call has time.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
T0=$(date +%s)
source "$(dirname "$0")/device_triton_env.sh"
STEPS=${STEPS:-decode small prefill train engine bench}
run_tests() {  # name, time limit (s), test files...
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" ${name%%_*} "* ]] || return 0
  timeout "$limit" python3 -m pytest -q -m gpu "$@" -p no:cacheprovider > "$OUT/$name.txt" 2>&1
  echo "rc $?" >> "$OUT/$name.txt"
  echo "$name: $(tail -2 "$OUT/$name.txt" | tr '\n' ' ') at $(( $(date +%s) - T0 )) s"
}
run_tests decode_gpu_tests 240 tests/test_kernels_decode.py
run_tests small_kernel_gpu_tests 60 tests/test_kernels_add_norm.py tests/test_kernels_phi_decode.py \
    tests/test_kernels_rope.py tests/test_kernels_silu_mul.py tests/test_checkpoint_shards.py
run_tests prefill_gpu_tests 240 tests/test_kernels_prefill.py
run_tests train_gpu_tests 60 tests/test_train_fast_attention.py tests/test_train_loop.py
run_tests engine_gpu_tests 240 tests/test_engine_async_scheduling.py tests/test_engine_attention.py \
    tests/test_engine_gpu_memory.py tests/test_engine_piecewise.py tests/test_engine_precompile.py \
    tests/test_engine_speculative.py
EL=$(( $(date +%s) - T0 ))
if [[ " $STEPS " == *" bench "* ]] && [ "$EL" -lt 480 ]; then
  timeout $(( 580 - EL )) python3 -m nsa_kernels.bench_decode --shape paper --ctx 65536 > "$OUT/bench_decode_64k.txt" 2>&1
  echo "rc $?" >> "$OUT/bench_decode_64k.txt"
  grep "^| paper" "$OUT/bench_decode_64k.txt"
fi
echo "end $(( $(date +%s) - T0 )) s"
