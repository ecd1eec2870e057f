#!/usr/bin/env bash
# Run on a lent GPU machine from the repo root: bash benchmarks/device/run.sh
set -euo pipefail
timeout 290 python benchmarks/device/gpu_bench.py "$@"
