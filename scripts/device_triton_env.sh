# Sourced after scripts/device_env.sh on the device machine: puts the Triton packed by
# scripts/pack_triton.sh (carried as .cache/) ahead of the image's, over the image's torch.
# TRITON_VERSION picks the pack (default 39 = 3.9). ptxas (and cuobjdump/nvdisasm) come from the
# device's CUDA 13: the pack leaves the wheel's own CUDA tools out to fit the carry.
TV=${TRITON_VERSION:-39}
mkdir -p "/tmp/triton$TV"
[ -d "/tmp/triton$TV/site" ] || tar xJf ".cache/triton${TV}_cp312.tar.xz" -C "/tmp/triton$TV"
# The wheel registers its AMD backend by entry point; the pack leaves that backend out.
sed -i "/amd/d" /tmp/triton$TV/site/triton-*.dist-info/entry_points.txt
PTXAS=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
export TRITON_PTXAS_BLACKWELL_PATH=$PTXAS TRITON_PTXAS_PATH=$PTXAS
export TRITON_CUOBJDUMP_PATH=$(command -v cuobjdump) TRITON_NVDISASM_PATH=$(command -v nvdisasm)
export PYTHONPATH="/tmp/triton$TV/site:$PYTHONPATH" TRITON_CACHE_DIR="/tmp/triton$TV-cache"
python3 -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)" | tee -a "$OUT/device.txt"
"$PTXAS" --version | tail -1 | tee -a "$OUT/device.txt"
