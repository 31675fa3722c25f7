#!/usr/bin/env bash
# Does the start-up precompile cover what long prompts meet? (docs/engine.md, "Start-up kernel
# compilation"; docs/benchmarks/engine.md, forty-second session.) Run from the repo root on a GPU
# machine; writes under ${OUT:-.}:
#   precompile_tests.txt  the GPU precompile tests (eager and piecewise prompt steps)
#   ttft_probe_cold.txt   scripts/ttft_probe.py on an empty Triton cache: each phase's TTFTs and the
#                         kernel variants compiled inside it ("none" when the precompile covered them)
#   new_keys.txt          the specialisation keys of any variant compiled after start-up
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
TRITON_CACHE_DIR=$(mktemp -d) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_engine_precompile.py 2>&1 | tee "$OUT/precompile_tests.txt"
TRITON_CACHE_DIR=$(mktemp -d) timeout ${PROBE_TIMEOUT:-280} python3 scripts/ttft_probe.py --repeat 2 --together 4 \
  --max-tokens 32 --keys "$OUT/new_keys.txt" 2>&1 | grep -v Warning | tee "$OUT/ttft_probe_cold.txt"
