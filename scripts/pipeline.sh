#!/usr/bin/env bash
# Sets up, checks params.yaml, gets the data (download and split: a download that fails says so at once), says
# how long the training takes here when there is no GPU, runs the rest of the pipeline with `dvc repro` (extra
# args go to it), then its headline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
cifar-rounds check params.yaml
dvc repro split
python -m cifar_rounds.training.pace  # without a GPU: how long the training takes here, from measured steps
dvc repro "$@"
cifar-rounds show --headline  # accuracy, epochs and the MLflow run; every metric: dvc metrics show
