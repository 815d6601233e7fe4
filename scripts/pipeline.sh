#!/usr/bin/env bash
# Sets up, checks params.yaml, then runs the whole pipeline with `dvc repro` (extra args go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m cifar_rounds.core.params params.yaml
dvc repro "$@"
dvc metrics show
