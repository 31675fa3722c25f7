#!/usr/bin/env bash
# One command per device call for training the default NSA model (docs/training.md).
#
# Run it again, unchanged, until it prints "ALL DONE". Each call trains for up to CALL_MIN minutes and
# checkpoints; the call that finishes training then serves the model and measures passkey retrieval
# through the HTTP API, if enough of the call's 10 minutes are left (else: EVAL_ONLY=1 next call).
#
# $OUT (returned files, at most 8): model/{config.json,model.safetensors,tokenizer.model,
# generation_config.json}, resume/{weights-0000{1,2}-of-00002.safetensors,state.json}, eval.json.
# Exact resume state stays in .ckpt/state on the machine (kept while it stays warm); between cold
# machines, copy $OUT/resume back to .ckpt/resume here and carry it.
set -euo pipefail
: "${OUT:?run this on the device machine, where OUT is set}"
CALL_MIN=${CALL_MIN:-8.5}      # training minutes in this call (a call may run 10)
TOTAL_MIN=${TOTAL_MIN:-14}     # training minutes over all calls: fixes --steps in the first call
SEED=${SEED:-0}
SAMPLES=${SAMPLES:-20}         # passkey prompts per length
LENGTHS=${LENGTHS:-4096,16384,32768,65536}
EVAL_MIN_S=${EVAL_MIN_S:-240}  # seconds the eval needs (server start + passkey prompts)
EVAL_ONLY=${EVAL_ONLY:-0}
PPL_TOKENS=${PPL_TOKENS:-262144}  # held-out tokens for perplexity
MODEL_DIR=${MODEL_DIR:-$OUT/model}
TRAIN_FLAGS=${TRAIN_FLAGS:-}   # more `train` flags, e.g. "--compile"
PORT=${PORT:-8123}
CKPT=${CKPT:-.ckpt}            # exact state in CKPT/state, compact resume carried in as CKPT/resume
DEVICE=${DEVICE:-cuda}         # the server's device (cpu only for a dry run of this script)
start=$(date +%s)

# Import the project without installing it: links give kernels/ its package name, nsa_kernels.
mkdir -p /tmp/nsa_path .ckpt
ln -sfn "$PWD/nsa_serve" /tmp/nsa_path/nsa_serve
ln -sfn "$PWD/kernels" /tmp/nsa_path/nsa_kernels
ln -sfn "$PWD/loadtest" /tmp/nsa_path/nsa_loadtest
export PYTHONPATH=/tmp/nsa_path PYTHONUNBUFFERED=1
# The server's packages the GPU image lacks (fastapi, uvicorn, pydantic, ...) travel as wheels in .whl/
# (docs/training.md says how to fetch them); training itself needs none of them.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/nsa_path:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "${PREFLIGHT:-0}" = 1 ]; then  # optional: time and size one sequence per length, then stop
  python3 -m nsa_serve.train.profile_step --seq-lens 2048,4096,16384 --q-chunks 2048 --repeats 1
  python3 -m nsa_serve.train.profile_step --seq-lens 2048,4096,16384 --q-chunks 2048 --repeats 1 --compile
  exit 0
fi

if [ "$EVAL_ONLY" != 1 ]; then
  # The batched fused-attention training path against the model's own forward, at the real shape.
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train_fast_attention.py || echo "GPU CHECK FAILED"
  # shellcheck disable=SC2086
  python3 -m nsa_serve.train.cli train --config default --data .data/train.bin --out "$OUT" \
    --state-dir "$CKPT/state" --resume "$CKPT/resume" --total-budget-min "$TOTAL_MIN" \
    --time-budget-min "$CALL_MIN" --seed "$SEED" $TRAIN_FLAGS
  final=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['extra'].get('final', False))" \
          "$OUT/model/config.json")
  if [ "$final" != True ]; then
    echo "TRAINING PAUSED: copy \$OUT/resume to .ckpt/resume, carry .data and .ckpt/resume, run again"
    exit 0
  fi
fi

left=$(( 590 - ($(date +%s) - start) ))
if [ "$left" -lt "$EVAL_MIN_S" ]; then
  echo "TRAINING DONE, eval skipped (${left}s left): copy \$OUT/model to nsa_serve/assets/default-model,"
  echo "then run: EVAL_ONLY=1 MODEL_DIR=nsa_serve/assets/default-model bash scripts/device_train.sh"
  exit 0
fi
if ! python3 -c "import fastapi, uvicorn, prometheus_client, httpx, pydantic" 2>/dev/null; then
  echo "EVAL SKIPPED: the server's packages are missing here; carry them as wheels (.whl, see the"
  echo "device README) and run: EVAL_ONLY=1 MODEL_DIR=... bash scripts/device_train.sh"
  exit 0
fi
python3 -m nsa_serve.cli serve "$MODEL_DIR" --port "$PORT" --device "$DEVICE" --gpu-memory-utilization 0.6 \
  --log-level warning &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
    2>/dev/null && break
  kill -0 $server 2>/dev/null || { echo "server exited"; exit 1; }
  sleep 0.5
done
left=$(( 590 - ($(date +%s) - start) ))
timeout "$left" python3 -m nsa_serve.train.cli eval --model "$MODEL_DIR" --data .data/heldout.bin \
  --base-url "http://127.0.0.1:$PORT" --lengths "$LENGTHS" --samples "$SAMPLES" --ppl-tokens "$PPL_TOKENS" \
  --out "$OUT/eval.json" || true
echo "ALL DONE"
