#!/usr/bin/env bash
# Run every benchmark; each prints its table and writes bench/results/<name>.json.
# Usage: bench/run-all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${VENV:-.venv}/bin"
mkdir -p bench/results
for name in handoff daemon decode models api e2e; do
  echo "=== clipline bench $name $*"
  "$bin/clipline" bench "$name" "$@" --out "bench/results/$name.json"
done
