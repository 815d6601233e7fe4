#!/usr/bin/env bash
# Sets up, then remakes the README's images in docs/images/ from the offline demo (scripts/figures.py; needs Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python scripts/figures.py "$@"
