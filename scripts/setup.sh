#!/usr/bin/env bash
# Creates .venv with the pinned packages (once per change of the pins) and the DVC project.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check \
    -r requirements.txt -r requirements-test.txt -e . 2>&1 \
    | sed "/is ignored: it is neither a file nor a directory/d"
  echo "$stamp" > .venv/.installed
fi

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  git init -q -b main
fi
if [ ! -d .dvc ]; then
  .venv/bin/dvc init -q
  .venv/bin/dvc config core.analytics false
fi
