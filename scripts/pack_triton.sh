#!/usr/bin/env bash
# Pack a PyPI Triton wheel small enough to carry to the device machine (whose image has Triton 3.6 and
# no network), so the kernels can be run on the Triton that `pip install torch==2.13.0` brings (3.9).
# The device's python is 3.12; its torch stays 2.11. What is left out, to fit the device tool's 64 MiB
# carry beside the tracked tree: the AMD backend, CUPTI, the profiler library (libproton) and the bundled
# CUDA tools (ptxas comes from the device's CUDA 13 instead: scripts/device_triton_env.sh). libtriton.so
# is stripped of its symbols (488 → 192 MB). Result: .cache/triton<version>_cp312.tar.xz (≈ 42 MB).
# Usage: PYTHON=.venv/bin/python bash scripts/pack_triton.sh [version]   (repo root; needs pip, strip, xz)
set -euo pipefail
VERSION=${1:-3.9.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
${PYTHON:-python3} -m pip download "triton==$VERSION" --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --no-deps -d "$WORK/whl" -q
mkdir -p "$WORK/full" "$WORK/site"
${PYTHON:-python3} -m zipfile -e "$WORK"/whl/triton-*.whl "$WORK/full"
(cd "$WORK/full" && tar cf - --exclude='__pycache__' --exclude='triton/backends/amd' \
    --exclude='triton/backends/nvidia/lib/cupti*' --exclude='triton/backends/nvidia/bin' \
    --exclude='triton/_C/libproton.so' triton triton-*.dist-info) | tar xf - -C "$WORK/site"
strip --strip-unneeded "$WORK/site/triton/_C/libtriton.so"
mkdir -p .cache
SHORT=$(echo "$VERSION" | cut -d. -f1,2 | tr -d .)
tar cf - -C "$WORK" site | xz -9 -T0 > ".cache/triton${SHORT}_cp312.tar.xz"
ls -la ".cache/triton${SHORT}_cp312.tar.xz"
