#!/usr/bin/env bash
# GPU readiness in one command, on a bare CUDA machine (the working tree and Python with torch):
# environment, `pytest -m gpu`, `dvc repro` at full width (bf16, compiled), SIGKILL + resume,
# training throughput (batch 96/128/512; eager, compiled, CUDA graphs) and a 250-epoch projection,
# within ten minutes. benchmarks/gpu_check.py does the work; its --help lists the options.
#   benchmarks/gpu.sh --fetch-wheels .whl   # first, where PyPI is reachable: the packages the GPU image lacks
#   benchmarks/gpu.sh                       # on the GPU machine (carry .whl); results in $OUT or ./gpu-out
#   benchmarks/gpu.sh --dry-run             # on a CPU: the pipeline and resume parts at width 4
# Exit status 1 if any part failed; without CUDA (and without --dry-run) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
