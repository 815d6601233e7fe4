"""The one place a stage's expected failures become a one-line error and an exit code; and the one wait, with
backoff, for a failure that time cures (a busy store, a database restarting), which a database's error shows by
its driver's code, never by the words of its message.

Plain Python only: every module may import it (the atomic-write helper too) without pulling in pydantic.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from cifar_rounds.core.inputs import FileArgumentError


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming the field."""


class StageError(RuntimeError):
    """An expected failure (bad input, unreachable URL, NaN loss): one line for the user."""


T = TypeVar("T")
INTERRUPTED_EXIT = 130  # the shell's code for a command ended by Ctrl-C
ECHO_CHARS = 40  # an input echoed in an error is cut to this: enough to recognise it, never a page of it


def short_repr(value: object) -> str:
    """repr(value), cut to ECHO_CHARS with "…": an error that echoes what it refused stays one short line."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 1] + "…"


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


# another connection's lock, which it releases: SQLITE_BUSY (a writer elsewhere), SQLITE_LOCKED (within this process)
SQLITE_WAIT_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# PostgreSQL's SQLSTATEs after which the same statement can pass later: a server shutting down (57P01, 57P02) or
# starting (57P03), too many connections (53300), a serialization failure or deadlock (40001, 40P01: the
# transaction, tried again, is the remedy PostgreSQL documents). Class 08, a connection exception, too.
PG_WAIT_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})
PG_CONNECTION_CLASS = "08"


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the error it was raised from or while handling, and so on: MLflow and Optuna wrap what they
    met, so the database's own error is further down."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:  # a chain built by hand may loop
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def sqlite_busy(error: sqlite3.Error) -> bool:
    """Whether sqlite failed on another connection's lock (its primary code, the extended code's low byte)."""
    code = getattr(error, "sqlite_errorcode", None)  # absent on the errors Python's module raises itself
    return code is not None and (code & 0xFF) in SQLITE_WAIT_CODES


def database_error_transient(error: BaseException) -> bool | None:
    """Whether waiting can cure `error`, a database's error (SQLAlchemy's DBAPIError, or sqlite3's own), judged
    in this order; None when `error` is no database's error.

    1. A connection SQLAlchemy found dead (`connection_invalidated`: cut, or the server restarted): a new one may
       work.
    2. sqlite: by its code, `sqlite_busy`; a read-only, missing or corrupt file is not cured by waiting.
    3. PostgreSQL: by the SQLSTATE (psycopg2's `pgcode`, psycopg 3's `sqlstate`): class 08 or PG_WAIT_STATES.
    4. No code (psycopg2 for every failure to connect: refused, reset, timed out, but also a database or a
       password the server refused, which is waited for too; the drivers whose codes are not read here,
       MySQL's): by the DB-API class SQLAlchemy mapped it to. An OperationalError is the database's operation
       failing, "an unexpected disconnect" first (PEP 249); an IntegrityError, a ProgrammingError and the rest
       would fail the same way again.
    """
    if isinstance(error, sqlite3.Error):
        return sqlite_busy(error)
    from sqlalchemy.exc import DBAPIError, OperationalError  # only when an error came; callers may never need it

    if not isinstance(error, DBAPIError):
        return None
    driver = error.orig
    if error.connection_invalidated:
        return True
    if isinstance(driver, sqlite3.Error):
        return sqlite_busy(driver)
    state = getattr(driver, "pgcode", None) or getattr(driver, "sqlstate", None)
    if state:
        return state.startswith(PG_CONNECTION_CLASS) or state in PG_WAIT_STATES
    return isinstance(error, OperationalError)
