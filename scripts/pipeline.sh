#!/usr/bin/env bash
# Sets up, checks params.yaml, runs the whole pipeline with `dvc repro` (extra args go to it), then its headline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m cifar_rounds.core.params params.yaml
dvc repro "$@"
python -m cifar_rounds.stages.headline  # accuracy, epochs and the MLflow run; every metric: dvc metrics show
