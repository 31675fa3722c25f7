# Sourced by scripts/device_env.sh when TRITON_PACK is set (e.g. 39 = 3.9): puts the Triton packed by
# scripts/pack_triton.sh (carried as .cache/) ahead of the image's, over the image's torch. ptxas (and
# cuobjdump/nvdisasm) come from the device's CUDA 13: the pack leaves the wheel's own CUDA tools out to
# fit the carry.
mkdir -p "/tmp/triton$TRITON_PACK"
[ -d "/tmp/triton$TRITON_PACK/site" ] || tar xJf ".cache/triton${TRITON_PACK}_cp312.tar.xz" -C "/tmp/triton$TRITON_PACK"
# The wheel registers its AMD backend by entry point; the pack leaves that backend out.
sed -i "/amd/d" /tmp/triton$TRITON_PACK/site/triton-*.dist-info/entry_points.txt
PTXAS=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
export TRITON_PTXAS_BLACKWELL_PATH=$PTXAS TRITON_PTXAS_PATH=$PTXAS
export TRITON_CUOBJDUMP_PATH=$(command -v cuobjdump) TRITON_NVDISASM_PATH=$(command -v nvdisasm)
export PYTHONPATH="/tmp/triton$TRITON_PACK/site:$PYTHONPATH" TRITON_CACHE_DIR="/tmp/triton$TRITON_PACK-cache"
echo "ptxas: $("$PTXAS" --version | tail -1)" | tee "$OUT/ptxas.txt"
