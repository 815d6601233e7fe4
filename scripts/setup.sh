#!/usr/bin/env bash
# Creates .venv with the pinned packages (once per change of the pins) and the DVC project.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing the pinned packages into .venv (first time: about 6 GB, 4-5 minutes on 2 cores"
  echo "setup: with a local mirror, longer over the internet; torch is PyPI's CUDA build, see README.md)"
  start=$SECONDS
  # pip's own lines show the progress: each package as it is collected, then the install
  .venv/bin/pip install --disable-pip-version-check --progress-bar off \
    -r requirements.txt -r requirements-test.txt -e . 2>&1 \
    | { grep --line-buffered -E "^(Collecting|Installing|Successfully|ERROR)" || true; } \
    | sed -E "s/^/setup: /; s/(Successfully installed).*/\1 (all pinned packages)/" \
    || { echo "setup: pip install failed; see the lines above" >&2; exit 1; }
  echo "$stamp" > .venv/.installed
  echo "setup: done in $((SECONDS - start)) s"
fi

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  git init -q -b main
fi
if [ ! -d .dvc ]; then
  .venv/bin/dvc init -q
  .venv/bin/dvc config core.analytics false
fi
