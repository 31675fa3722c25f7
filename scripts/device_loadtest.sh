#!/usr/bin/env bash
# The operator's run on a GPU machine: the real HTTP server (nsa-serve serve) with a random-initialised
# paper-1b model (64 q heads, 4 kv heads, dk 192, dv 128; a tokenizer trained on offline text), driven
# by nsa-loadtest with long documents, once with NSA attention and once with dense attention over
# the same pages; each run's report, its server log and a final /metrics scrape land under ${OUT:-.}.
# The device image lacks the server's packages: carry them as wheels (.whl, see
# /work/.library/device/README.md) and install them first; device_env.sh sets PYTHONPATH, so pass their
# folder as EXTRA_PYTHONPATH, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && EXTRA_PYTHONPATH=/tmp/site bash scripts/device_loadtest.sh
# Knobs: MODES (nsa dense), DOC (64k), REQS (16), CONC (8), OUTLEN (256), MODEL (/tmp/paper-1b),
# PLOTS (1; 0 skips the PNGs). The device tool brings back at most 8 files a call: each mode writes 7
# (its log, report, /metrics scrape, JSON and 3 plots), beside device.txt, init_model.txt and, with
# TRITON_PACK, ptxas.txt. With two modes, or two runs in one call, pass PLOTS=0 and tar $OUT's folders,
# or some runs' files stay behind (the sixtieth session lost a whole run's that way).
# On torch 2.13's Triton 3.9 (TRITON_PACK=39, carrying .cache and .whl): the pack (42 MB), the tree (21 MB) and
# the wheels fit the 64 MiB carry only without llguidance's 3 MB wheel — leave it out (the server imports it
# only for structured outputs, which the load test does not ask for); the rest is 3.4 MB (fastapi, starlette,
# uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, anyio,
# opentelemetry-api: the device image has the others).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
MODEL=${MODEL:-/tmp/paper-1b}
PORT=${PORT:-8000}
paper_model "$MODEL"

for mode in ${MODES:-nsa dense}; do
  t0=$(date +%s)
  python3 -m nsa_serve.cli serve "$MODEL" --attention "$mode" --port "$PORT" > "$OUT/serve_$mode.log" 2>&1 &
  pid=$!
  if ! wait_healthy $pid ${START_TIMEOUT:-300}; then
    echo "server ($mode) did not become healthy"; tail -30 "$OUT/serve_$mode.log"; kill -9 $pid; continue
  fi
  echo "server ($mode) healthy after $(( $(date +%s) - t0 )) s"
  timeout ${RUN_TIMEOUT:-400} python3 -m nsa_loadtest.cli --base-url "http://127.0.0.1:$PORT" --workload longdoc \
    --doc-lengths "${DOC:-64k}" --num-requests "${REQS:-16}" --max-concurrency "${CONC:-8}" \
    --output-len "${OUTLEN:-256}" --ignore-eos --warmup 1 --no-progress --result-dir "$OUT/loadtest_$mode" \
    $([ "${PLOTS:-1}" = 0 ] && echo --no-plots) 2>&1 \
    | tee "$OUT/loadtest_$mode.txt"
  python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics').read().decode())" \
    > "$OUT/metrics_$mode.txt" 2>&1
  kill -INT $pid; timeout 60 tail --pid=$pid -f /dev/null || kill -9 $pid
done
