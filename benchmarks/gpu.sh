#!/usr/bin/env bash
# The GPU rows of RESULTS.md in one run (several minutes, mostly compilation): training throughput
# at batch 128 and 512, eager, compiled, and compiled with CUDA graphs, on the first CUDA device.
# Needs only torch, torchvision and pillow (no project install), so it runs on a bare GPU machine.
# Output: stdout and gpu-results.txt in $OUT (or here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device; on CPU run benchmarks/training_throughput.py')"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # reduce-overhead (CUDA graphs) is measured, not used by the train stage until it is shown to pay
  for args in "--batch-size 128" "--batch-size 128 --compile" "--batch-size 128 --compile --compile-mode reduce-overhead" \
              "--batch-size 512" "--batch-size 512 --compile" "--batch-size 512 --compile --compile-mode reduce-overhead"; do
    # shellcheck disable=SC2086  # word splitting of args is intended
    "$python" benchmarks/training_throughput.py --steps 50 --data-batches 50 $args
  done
} 2>&1 | tee "${OUT:-.}/gpu-results.txt"
