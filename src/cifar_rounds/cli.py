"""The one place a stage's expected failures become a one-line error and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cifar_rounds.params import ParamsError


class StageError(RuntimeError):
    """An expected failure (bad input, unreachable URL, NaN loss): one line for the user."""


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main(); expected failures print `error: ...` and exit 1."""
    try:
        main()
    except (StageError, ParamsError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
