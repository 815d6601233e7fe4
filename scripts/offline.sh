#!/usr/bin/env bash
# Sets up, then runs every stage offline on a generated CIFAR-format archive (see cifar_rounds/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m cifar_rounds.stages.demo "$@"
