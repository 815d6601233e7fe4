"""The one place a stage's expected failures become a one-line error and an exit code.

Plain Python only: every module may import it (the atomic-write helper too) without pulling in pydantic.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from cifar_rounds.core.inputs import FileArgumentError


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming the field."""


class StageError(RuntimeError):
    """An expected failure (bad input, unreachable URL, NaN loss): one line for the user."""


INTERRUPTED_EXIT = 130  # the shell's code for a command ended by Ctrl-C


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main(); expected failures print `error: ...` and exit 1, interrupts one line and 130."""
    try:
        main()
    except (StageError, ParamsError, FileArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as error:
        how = f" by {error}" if str(error) else ""
        print(
            f"interrupted{how}: finished work (checkpoints, logged epochs) is kept; rerun to continue", file=sys.stderr
        )
        raise SystemExit(INTERRUPTED_EXIT) from None
