"""Patience with the MLflow store: which of its errors waiting can cure, judged by type and code along the
error's chain (never by its words), and the one retry loop every write goes through.

A busy store (a locked sqlite file, a server that stops answering) is waited for, with backoff, for up to
`tracking.store_patience_s` per write, with one line printed; past that the caller stops with one line.
Any other error stops it at once. A new row another process inserted a moment earlier is tried once more.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

import requests
from mlflow.exceptions import MlflowException

from cifar_rounds.core.errors import StageError, causes, database_error_transient, with_patience

T = TypeVar("T")
# an answer a server gives while it is busy or away: too many requests, a proxy's bad gateway, unavailable, a
# proxy's timeout
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
SQLITE_UNIQUE_CODES = frozenset({sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY})
PG_UNIQUE_VIOLATION = "23505"  # SQLSTATE unique_violation
PG_ALREADY_EXISTS = frozenset({"42P07", "42710"})  # SQLSTATE duplicate_table, duplicate_object
MYSQL_DUPLICATE_ENTRY = 1062  # ER_DUP_ENTRY


def transient(error: BaseException) -> bool:
    """Whether waiting can cure a store error, by the types and codes along its chain (MLflow wraps what it met),
    in this order:

    1. A database's error (a local or SQLAlchemy store's): its driver's code, `database_error_transient` (a
       locked sqlite file is, a read-only one is not), whatever MLflow's code says: MLflow calls every
       OperationalError TEMPORARILY_UNAVAILABLE.
    2. No answer from the server: a connection refused, cut or timed out (requests' ConnectionError, a TLS
       failure aside, and Timeout).
    3. A server that kept answering a status MLflow's client retries by itself, past those retries (requests'
       RetryError: 408, 429, 500, 502, 503, 504, mlflow.utils.request_utils; which one is not kept).
    4. A server's answer with a status of TRANSIENT_STATUSES (TEMPORARILY_UNAVAILABLE is 503).
    """
    links = list(causes(error))
    for link in links:
        verdict = database_error_transient(link)
        if verdict is not None:
            return verdict
    for link in links:
        if isinstance(link, requests.exceptions.SSLError):  # a ConnectionError too, but a certificate stays wrong
            return False
        if isinstance(
            link, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
        ):
            return True
    answer = next((link for link in links if isinstance(link, MlflowException)), None)
    return answer is not None and answer.get_http_status_code() in TRANSIENT_STATUSES


def lost_an_insert_race(error: MlflowException) -> bool:
    """Whether `error` is a unique key that another process inserted first, by code. MLflow's code for a write
    its database refused (any SQLAlchemy error but an OperationalError) is BAD_REQUEST; its own checks of a
    request answer INVALID_PARAMETER_VALUE or RESOURCE_DOES_NOT_EXIST. Then the database's error in the chain,
    a local store's, says whether the key was a duplicate (`unique_violation`); a server's answer holds no
    more than the code, so BAD_REQUEST it is: a wrong guess costs one more call that fails alike."""
    from sqlalchemy.exc import DBAPIError, IntegrityError  # as `database_error_transient`, once an error came

    if error.error_code != "BAD_REQUEST":
        return False
    for link in causes(error):
        if isinstance(link, DBAPIError):
            return isinstance(link, IntegrityError) and unique_violation(link.orig)
    return True


def unique_violation(driver: BaseException) -> bool:
    """Whether a database driver's error is a duplicate unique or primary key, by sqlite's extended code,
    PostgreSQL's SQLSTATE (psycopg2's `pgcode`, psycopg 3's `sqlstate`) or MySQL's error number (args[0] of
    PyMySQL's and mysqlclient's errors)."""
    if isinstance(driver, sqlite3.Error):
        return getattr(driver, "sqlite_errorcode", None) in SQLITE_UNIQUE_CODES
    state = getattr(driver, "pgcode", None) or getattr(driver, "sqlstate", None)
    if state:
        return state == PG_UNIQUE_VIOLATION
    return bool(driver.args) and driver.args[0] == MYSQL_DUPLICATE_ENTRY


def lost_a_creation_race(error: BaseException) -> bool:
    """Whether another process created the same tables (or their rows) a moment earlier: a unique violation, or
    PostgreSQL's duplicate table or object, anywhere in the error's chain."""
    from sqlalchemy.exc import DBAPIError

    for link in causes(error):
        if isinstance(link, DBAPIError) and isinstance(link.orig, Exception):
            state = getattr(link.orig, "pgcode", None) or getattr(link.orig, "sqlstate", None)
            if state in PG_ALREADY_EXISTS or unique_violation(link.orig):
                return True
    return False


def after_a_lost_insert_race(call: Callable[[], T]) -> T:
    """`call()`, tried once more when another process inserted the same new row a moment earlier (trainings
    that start together add a dataset new to the experiment): the second try finds it there."""
    try:
        return call()
    except MlflowException as error:
        if not lost_an_insert_race(error):
            raise
        return call()


def patiently(call: Callable[[], T], what: str, patience_s: float) -> T:
    """`call()`, retried with backoff while the store is busy, for up to `patience_s` seconds."""

    def cure(error: Exception) -> str | None:
        if not isinstance(error, MlflowException):
            return None
        first = str(error).strip().splitlines()[0][:160]
        if not transient(error):
            raise StageError(f"tracking: {what} failed ({first})") from None
        return first

    return with_patience(
        call,
        cure,
        patience_s,
        lambda why: f"tracking: the MLflow store is busy ({why}); retrying for up to {patience_s:.0f} s "
        "(tracking.store_patience_s)",
        lambda why: f"tracking: the MLflow store stayed unavailable for {patience_s:.0f} s ({why}); "
        "the last checkpoint is safe: rerun to resume",
    )
