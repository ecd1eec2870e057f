#!/usr/bin/env bash
# The prepared GPU check, one call on a lent machine (under 8 minutes), from the repo root:
#   bash benchmarks/device/run.sh [TOKENIZER_DIR]
# TOKENIZER_DIR: the SmolLM2 tokenizer files (the lent machine has no copy of the embedded model).
set -uo pipefail
tok=${1:+--tokenizer $1}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== training through mmgrpo serve on CUDA (gpu_remote.py)"
timeout 170 python3 benchmarks/device/gpu_remote.py $tok
echo "== the whole loop on CUDA + resume (gpu_loop.py)"
timeout 170 python3 benchmarks/device/gpu_loop.py $tok
echo "== update and decode speed, 0.5B shape (gpu_bench.py)"
timeout 120 python3 benchmarks/device/gpu_bench.py --shapes 0.5b
