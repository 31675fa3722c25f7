# nsa-serve: an OpenAI-compatible server for Native Sparse Attention models, on a CUDA GPU.
#
#   docker build -t nsa-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 nsa-serve:0.1.0                      # the bundled model
#   docker run --gpus all -p 8000:8000 -v /models/m:/models/m:ro nsa-serve:0.1.0 /models/m --max-num-seqs 32
#
# Everything after the image name goes to `nsa-serve serve` (the ENTRYPOINT): a model directory and/or
# any serve flag. A later --host/--port overrides the defaults below (argparse keeps the last value).
# Operator guide: docs/operations.md.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

# ---- build stage: a virtual environment with CUDA torch and the package --------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS build

# The CUDA build of torch must match the base image's CUDA major.minor (cu128 <-> 12.8); the GPU
# machines the project is benchmarked on run torch 2.11.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Versions are not pinned: the CUDA base image's Ubuntu point release decides them and pinning
# breaks the build at every base-image refresh.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# The whole build context: .dockerignore leaves only what `pip install .` needs (pyproject.toml and
# the package directories it lists), so a new package directory needs no edit here.
COPY . .
# torch is already satisfied, so this brings only the pure-Python dependencies.
RUN pip install --no-cache-dir .

# Bake the default model into the image: `nsa-serve serve` with no model argument finds it here
# (the repo's shipped model when present, else the tiny preset created now), so a container never
# writes a model at start and can run with a read-only root filesystem.
ENV NSA_SERVE_CACHE=/opt/nsa-serve/cache
RUN mkdir -p "${NSA_SERVE_CACHE}" \
    && python -c "from nsa_serve.model.init_model import ensure_default_model; print(ensure_default_model())"

# ---- runtime stage -----------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

# Triton builds a small C launcher for each kernel signature at first use, so the runtime image
# needs a C compiler, libc headers and Python.h.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid so Kubernetes' runAsNonRoot can check it without a user name lookup. The
# Triton cache directory exists in the image, owned by it, so a new named volume mounted there
# (deploy/compose) starts with that owner.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin nsa \
    && mkdir -p /tmp/triton-cache && chown 10001:10001 /tmp/triton-cache

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/nsa-serve /opt/nsa-serve

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NSA_SERVE_CACHE=/opt/nsa-serve/cache \
    TRITON_CACHE_DIR=/tmp/triton-cache \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001
WORKDIR /home/nsa
EXPOSE 8000

# /health is liveness: 200 while the engine loop is alive, 503 once it has died. start-period
# covers weight loading and warm-up. The probe uses Python because the image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# SIGTERM makes the server stop taking requests and drain running ones for --shutdown-timeout
# seconds; exec form makes nsa-serve PID 1 so it receives the signal itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["nsa-serve", "serve", "--host", "0.0.0.0", "--port", "8000"]
