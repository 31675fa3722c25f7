#!/usr/bin/env bash
# Streams against long-document arrivals on a GPU machine: this tree's server, and optionally an
# earlier nsa_serve (OLD_SERVE: a folder holding that version's nsa_serve package, the rest of the
# tree — kernels, load tester, probes — kept the same), each with the paper-1b random model and NSA
# attention: scripts/stream_stall_probe.py (one stream and /health polls while 600 KB documents arrive,
# each a 400 once tokenized, then while 6000-token prompts are echoed with logprobs 5; the stream
# STREAM_TOKENS long, 4000 by default so it outlasts them on a GPU), then nsa-loadtest's
# longdoc workload (DOC, REQS, CONC as scripts/device_loadtest.sh; LOADTEST=0 skips it).
# Wheels as for device_loadtest.sh (EXTRA_PYTHONPATH). Lands in $OUT: <variant>_probe.txt,
# <variant>_loadtest.txt, <variant>.json (the load test's report), device.txt, init_model.txt — the
# 8 files the device tool brings back (the servers' logs stay in /tmp, their tails printed on failure).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
MODEL=${MODEL:-/tmp/paper-1b}
PORT=${PORT:-8000}
paper_model "$MODEL"
variants="new${OLD_SERVE:+ old}"
for v in $variants; do
  if [ "$v" = old ]; then ln -sfn "$OLD_SERVE/nsa_serve" /tmp/nsa_path/nsa_serve; else ln -sfn "$PWD/nsa_serve" /tmp/nsa_path/nsa_serve; fi
  # -P: without it `-m` puts the working directory (this tree) first on the path, ahead of the link,
  # and both variants would run this tree's nsa_serve.
  python3 -P -m nsa_serve.cli serve "$MODEL" --attention nsa --port "$PORT" > "/tmp/${v}_serve.txt" 2>&1 &
  pid=$!
  t0=$(date +%s)
  if ! wait_healthy $pid 300; then
    echo "server ($v) did not become healthy"; tail -30 "/tmp/${v}_serve.txt"; kill -9 $pid; continue
  fi
  echo "server ($v) healthy after $(( $(date +%s) - t0 )) s, running $(python3 -P -c 'import nsa_serve, os; print(os.path.dirname(os.path.realpath(nsa_serve.__file__)))')"
  timeout 120 python3 scripts/stream_stall_probe.py --base-url "http://127.0.0.1:$PORT" --stream-tokens "${STREAM_TOKENS:-4000}" \
    2>&1 | tee "$OUT/${v}_probe.txt"
  timeout 120 python3 scripts/stream_stall_probe.py --base-url "http://127.0.0.1:$PORT" --stream-tokens "${STREAM_TOKENS:-4000}" \
    --kind echo-logprobs --prompt-tokens 6000 --doc-chars 60000 --docs 3 2>&1 | tee -a "$OUT/${v}_probe.txt"
  if [ "${LOADTEST:-1}" = 1 ]; then
    timeout ${RUN_TIMEOUT:-300} python3 -m nsa_loadtest.cli --base-url "http://127.0.0.1:$PORT" --workload longdoc \
      --doc-lengths "${DOC:-64k}" --num-requests "${REQS:-16}" --max-concurrency "${CONC:-8}" --output-len 256 \
      --ignore-eos --warmup 1 --no-progress --no-plots --result-dir /tmp/lt_$v --result-name run > "$OUT/${v}_loadtest.txt" 2>&1
    cp /tmp/lt_$v/run.json "$OUT/$v.json" 2> /dev/null
    grep -E "TTFT|ITL|Duration|Failed|Successful" "$OUT/${v}_loadtest.txt"
  fi
  { grep -h "froze" "/tmp/${v}_serve.txt"; curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "gc_pause_seconds_(count|sum)"; } \
    | tee -a "$OUT/${v}_probe.txt"
  kill -INT $pid; timeout 60 tail --pid=$pid -f /dev/null || kill -9 $pid
done
