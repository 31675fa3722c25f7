#!/usr/bin/env bash
# The engine's GPU acceptance run (docs/benchmarks/engine.md): a random-initialised ~1B NSA model of
# paper-like attention shape (preset paper-1b: 64 q heads, 4 kv heads, dk 192, dv 128) served by the
# real engine at 32k and 64k contexts, NSA vs dense attention over the same pages.
# Run from the repo root on a GPU machine; writes JSON and the log under ${OUT:-.}.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
REQS=${REQS:-4}
OUTLEN=${OUTLEN:-64}
for ctx in ${CTXS:-32768 65536}; do
  echo "=== context $ctx, $REQS requests, $OUTLEN output tokens ==="
  timeout ${STEP_TIMEOUT:-240} python3 -m nsa_serve.cli bench --preset "${PRESET:-paper-1b}" --attention both \
    --num-requests "$REQS" --input-len "$ctx" --output-len "$OUTLEN" \
    --max-num-batched-tokens 8192 --long-prefill-token-threshold 8192 --json "$OUT/engine_bench_$ctx.json" \
    2>&1 | tee -a "$OUT/engine_bench.log"
done
