#!/usr/bin/env bash
# First-use Triton compilation in the engine's TTFTs (docs/benchmarks/engine.md, ninth session): the
# engine bench, NSA only, once with an emptied Triton cache and once again with the cache it filled,
# for each decode top-n mode in TOPNS (the mode is set as nsa_decode_tuned's default for the run).
# Run from the repo root on a GPU machine; JSON and the log land in ${OUT:-.}. About 4 × 40 s at the
# defaults (8 requests × 64k prompt + 512 output tokens).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
REQS=${REQS:-8}
CTX=${CTX:-65536}
OUTLEN=${OUTLEN:-512}
for topn in ${TOPNS:-cand sort}; do
  export TRITON_CACHE_DIR=/tmp/nsa_coldwarm_cache_$topn
  rm -rf "$TRITON_CACHE_DIR"
  for run in cold warm; do
    echo "=== top-n $topn, $run Triton cache, $REQS requests × $CTX + $OUTLEN ===" | tee -a "$OUT/coldwarm.log"
    timeout "${STEP_TIMEOUT:-150}" python3 - "$topn" "$REQS" "$CTX" "$OUTLEN" "$OUT/coldwarm_${topn}_$run.json" \
      <<'PY' 2>&1 | grep -v Warning | tee -a "$OUT/coldwarm.log"
import logging
import sys
import nsa_kernels.nsa_decode as nd
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
logging.getLogger("nsa_serve.engine").setLevel(logging.INFO)  # the warm-up's breakdown
topn, reqs, ctx, outlen, js = sys.argv[1:]
f = nd.nsa_decode_tuned
names = f.__code__.co_varnames[:f.__code__.co_argcount]
defaults = list(f.__defaults__)
defaults[names.index("topn") - (len(names) - len(defaults))] = topn
f.__defaults__ = tuple(defaults)
from nsa_serve.cli import main
main(["bench", "--preset", "paper-1b", "--attention", "nsa", "--num-requests", reqs, "--input-len", ctx,
      "--output-len", outlen, "--max-num-batched-tokens", "8192", "--long-prefill-token-threshold", "8192",
      "--warmup-rounds", "0", "--json", js])
PY
  done
done
