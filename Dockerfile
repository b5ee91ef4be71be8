# syntax=docker/dockerfile:1.7
#
# One image for every clipline process. The entrypoint is the `clipline` console script:
#   clipline api          the HTTP job API            (port 8080)
#   clipline worker       Celery CPU workers          (metrics 9401)
#   clipline gpu-daemon   the GPU inference daemon    (metrics 9400)
#   clipline-operator run the kopf operator           (metrics 9402; override the command)
#
# Targets:
#   runtime   (default) CUDA runtime + cuDNN, PyTorch with CUDA; ffmpeg (libx264, AAC)
#             comes from the imageio-ffmpeg wheel, not from apt
#   tensorrt  the same plus TensorRT for `--backend tensorrt`
#
#   docker build -t clipline:0.1.0 .
#   docker build --target tensorrt -t clipline:0.1.0-tensorrt .
#
# The base is pinned by tag: CUDA 12.8.1 with cuDNN on Ubuntu 24.04 (Python 3.12). The
# PyTorch wheels come from the matching CUDA 12.8 index; their CUDA libraries need an
# NVIDIA driver >= 570 on the node. Override both build arguments together.
# Every other package is pinned by constraints.txt (the versions CI tests); torch, which
# that file leaves out (its CPU and CUDA builds come from different indexes), by
# TORCH_VERSION.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Distribution packages follow the pinned base image's release; versions are not pinned
# so that security updates apply on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
        python3-venv \
        tini \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------
FROM base AS builder
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY clipline_core ./clipline_core
COPY clipline ./clipline
COPY workers ./workers
COPY gpu_service ./gpu_service
COPY operator ./operator
COPY bench/clipline_bench ./bench/clipline_bench
# One image serves every role (daemon, workers, API, operator): the extras of each, with
# every decode backend of the workers (nvdec runs where the pod sees its GPU). The
# check at the end: the wheel's ffmpeg runs here and has libx264 and AAC.
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt \
        "torch==${TORCH_VERSION}" "./[gpu,models,captions,operator,s3,pyav,nvdec]" \
    && clipline --help >/dev/null \
    && clipline-operator --help >/dev/null \
    && python -c "from workers import ffmpeg; assert ffmpeg.find('bundled'), 'no bundled ffmpeg'"

# ---------------------------------------------------------------------------------------
FROM builder AS builder-tensorrt
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt \
        "torch==${TORCH_VERSION}" "./[tensorrt]" \
    && python -c "import tensorrt"

# ---------------------------------------------------------------------------------------
FROM base AS runtime-base
RUN groupadd --gid 10001 clipline \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin clipline
ENV PATH=/opt/venv/bin:$PATH \
    CLIPLINE_STATE_DIR=/tmp/clipline \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
EXPOSE 8080 9400 9401 9402
ENTRYPOINT ["/usr/bin/tini", "--", "clipline"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------
FROM runtime-base AS tensorrt
COPY --from=builder-tensorrt /opt/venv /opt/venv
USER 10001:10001

# ---------------------------------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
