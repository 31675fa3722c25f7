# Sourced by scripts/device_*.sh (run from the repo root on a GPU machine): outputs go under
# ${OUT:-.}; the project is imported without installing it — links give kernels/ and loadtest/
# their package names, nsa_kernels and nsa_loadtest; prints the device and library versions (also into $OUT/device.txt).
OUT=${OUT:-.}
mkdir -p "$OUT" /tmp/nsa_path
ln -sfn "$PWD/nsa_serve" /tmp/nsa_path/nsa_serve
ln -sfn "$PWD/kernels" /tmp/nsa_path/nsa_kernels
ln -sfn "$PWD/loadtest" /tmp/nsa_path/nsa_loadtest
# EXTRA_PYTHONPATH: where carried wheels were installed (the server's packages; device_loadtest.sh).
export PYTHONPATH=/tmp/nsa_path${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} PYTHONUNBUFFERED=1
# TRITON_PACK=39: run on the Triton that scripts/pack_triton.sh packed (carried as .cache/), not the image's.
if [ -n "${TRITON_PACK:-}" ]; then source "$(dirname "${BASH_SOURCE[0]}")/device_triton_env.sh"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# wait_healthy PID SECONDS (device_loadtest.sh, device_stall_check.sh, with PORT set):
wait_healthy() {  # until /health answers 200; fails when the server process ($1) is gone or after $2 s
  python3 -c "
import os, sys, time, urllib.request
deadline = time.time() + $2
while time.time() < deadline:
    try:
        os.kill($1, 0)
    except OSError:
        sys.exit(1)
    try:
        if urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(1)
"
}
# paper_model DIR: a random-initialised paper-1b model there (64 q heads, 4 kv heads, dk 192, dv 128),
# made once a machine; its output in $OUT/init_model.txt.
paper_model() {
  [ -d "$1" ] || timeout 300 python3 -m nsa_serve.cli init-model --preset paper-1b --out "$1" > "$OUT/init_model.txt" 2>&1
}
