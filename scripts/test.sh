#!/usr/bin/env bash
# Sets up, then runs the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m pytest "$@"
