# Sourced by scripts/device_*.sh (run from the repo root on a GPU machine): outputs go under
# ${OUT:-.}; the project is imported without installing it — links give kernels/ and loadtest/
# their package names, nsa_kernels and nsa_loadtest; prints the device and library versions (also into $OUT/device.txt).
OUT=${OUT:-.}
mkdir -p "$OUT" /tmp/nsa_path
ln -sfn "$PWD/nsa_serve" /tmp/nsa_path/nsa_serve
ln -sfn "$PWD/kernels" /tmp/nsa_path/nsa_kernels
ln -sfn "$PWD/loadtest" /tmp/nsa_path/nsa_loadtest
export PYTHONPATH=/tmp/nsa_path PYTHONUNBUFFERED=1
# TRITON_PACK=39: run on the Triton that scripts/pack_triton.sh packed (carried as .cache/), not the image's.
if [ -n "${TRITON_PACK:-}" ]; then source "$(dirname "${BASH_SOURCE[0]}")/device_triton_env.sh"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
