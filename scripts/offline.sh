#!/usr/bin/env bash
# Sets up, then runs every stage offline on a generated CIFAR-format archive: `cifar-rounds demo` (extra args go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
cifar-rounds demo "$@"
