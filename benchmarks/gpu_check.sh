#!/usr/bin/env bash
# The GPU check, for a machine with a GPU and CuPy but no cuDF, no network and nothing of
# this project installed: run from the repository root.
#
#   bash benchmarks/gpu_check.sh            # results also under $OUT when it is set
#
# 1. every kernel's and every operator's CPU/GPU parity tests (the tests' `backend`
#    fixture runs each on both engines), the engines against the reference model, and the
#    native decoder's kernel tests;
# 2. benchmarks/gpu_check.py: the decode kernel on the device against the CPU target and the
#    device copy bandwidth, and the whole operator pipeline on both engines, tables compared.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_PIPELINE_CACHE_DIR="${GPU_PIPELINE_CACHE_DIR:-/tmp/gpu-pipeline-cache}"
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"

echo "== GPU parity tests"
"$PY" -m pytest -q -p no:cacheprovider -p no:randomly -m "not kafka and not slow and not tsan" \
    tests/kernels tests/backend tests/operators tests/test_engine_vs_reference.py \
    tests/test_quality.py -k "not totals and not ingest_lag" 2>&1 | tee "$OUT/tests.txt"

echo "== device decode and operators, CPU vs GPU"
"$PY" benchmarks/gpu_check.py --events "${EVENTS:-2000000}" --out "$OUT/gpu_check.json" \
    2>&1 | tee "$OUT/gpu_check.txt"
