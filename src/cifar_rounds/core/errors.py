"""The one place a stage's expected failures become a one-line error and an exit code; and the one wait, with
backoff, for a failure that time cures (a busy store, a database restarting).

Plain Python only: every module may import it (the atomic-write helper too) without pulling in pydantic.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

from cifar_rounds.core.inputs import FileArgumentError


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming the field."""


class StageError(RuntimeError):
    """An expected failure (bad input, unreachable URL, NaN loss): one line for the user."""


T = TypeVar("T")
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


def with_patience(
    call: Callable[[], T],
    cure: Callable[[Exception], str | None],
    patience_s: float,
    waiting: Callable[[str], str],
    gave_up: Callable[[str], str],
    longest_pause_s: float = 30.0,
) -> T:
    """`call()`, tried again while `cure(error)` says why waiting can cure it (None: raised as it is), pausing
    0.5 s and doubling up to `longest_pause_s`, for up to `patience_s` seconds. The first such error prints one
    line, `waiting(why)`; past the patience it is `StageError(gave_up(why))`."""
    deadline, delay = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return call()
        except Exception as error:
            why = cure(error)
            if why is None:
                raise
            if time.monotonic() + delay > deadline:
                raise StageError(gave_up(why)) from None
            if delay == 0.5:
                print(waiting(why), flush=True)
            time.sleep(delay)
            delay = min(2 * delay, longest_pause_s)
