"""The study's storage, as the sweep's workers and its trials open it: every call waits out a database that went away.

A shared study lives in a database server (PostgreSQL, MySQL) that may restart during a night's
sweep. Each storage call that finds the database unreachable (a connection refused or cut, a
locked sqlite file), as the driver's error code says, is tried again, with one line printed per
outage, for up to `tracking.store_patience_s`, the patience the MLflow store gets; past that the
process stops with one line naming the storage, and the same command continues the study. Every
other error (a read-only sqlite file among them) is raised as it is, at once. Optuna is imported
only here and only when a storage is opened.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import TypeVar

from cifar_rounds.core.errors import StageError, causes, database_error_transient, with_patience
from cifar_rounds.core.urls import without_password

RETRY_CAP_S = 5.0  # the longest pause between two tries: a database back is used within seconds
T = TypeVar("T")


def shown(url: str) -> str:
    """The URL as messages show it: without its password (refused in params anyway; this covers any other)."""
    return without_password(url)


def unreachable(error: BaseException) -> str | None:
    """The first line of the database error in `error`'s chain (Optuna wraps it) when waiting can cure it, as
    its driver's code says (`database_error_transient`); None when it cannot, or there is none."""
    for link in causes(error):
        transient = database_error_transient(link)
        if transient is not None:
            return str(link).strip().splitlines()[0][:160] if transient else None
    return None


def retried(call: Callable[[], T], url: str, patience_s: float) -> T:
    """`call()`, tried again while the database is unreachable, for up to `patience_s` seconds."""
    return with_patience(
        call,
        unreachable,
        patience_s,
        lambda why: f"sweep: the study's storage {shown(url)} is unreachable ({why}); retrying for up to "
        f"{patience_s:.0f} s (tracking.store_patience_s)",
        lambda why: f"sweep: the study's storage {shown(url)} stayed unreachable for {patience_s:.0f} s ({why}); "
        "run the same command again to continue the study",
        longest_pause_s=RETRY_CAP_S,
    )


@functools.cache
def patient_storage_class() -> type:
    """A storage whose every public call, and every heartbeat call, is `retried` on the RDB storage it wraps (built
    once, on first use: Optuna is imported only by sweeps). Optuna runs its heartbeat for a storage that is a
    BaseHeartbeat with an interval: so is this one when the wrapped one is. Once a call has waited out the
    patience, the process is stopping: every later call fails at once, with the same line."""
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    def delegate(name: str) -> Callable:
        def call(self, *args, **kwargs):
            if self.gave_up is not None:
                raise StageError(self.gave_up)
            try:
                return retried(lambda: getattr(self.inner, name)(*args, **kwargs), self.url, self.patience_s)
            except StageError as error:
                self.gave_up = str(error)
                raise

        call.__name__ = name
        return call

    class PatientStorage(BaseStorage, BaseHeartbeat):
        def __init__(self, inner: BaseStorage, url: str, patience_s: float) -> None:
            self.inner, self.url, self.patience_s = inner, url, patience_s
            self.gave_up: str | None = None

        def record_heartbeat(self, trial_id: int) -> None:
            """One beat, not waited for: a beat the database missed is the next one's to make (a trial silent for
            the grace period is failed and retried), and Optuna's heartbeat thread must not die of it."""
            try:
                self.inner.record_heartbeat(trial_id)
            except Exception as error:
                if unreachable(error) is None:
                    raise

    heartbeat = {"_get_stale_trial_ids"}  # Optuna's own helpers call this private one
    for base in (BaseStorage, BaseHeartbeat):
        for name, member in vars(base).items():
            if callable(member) and name != "record_heartbeat" and (not name.startswith("_") or name in heartbeat):
                setattr(PatientStorage, name, delegate(name))
    return abc.update_abstractmethods(PatientStorage)


def patient_storage(url: str, patience_s: float, wait_to_open: bool, heartbeat: dict | None = None):
    """Optuna's RDB storage at `url`, each call retried. A worker starting opens it at once (a wrong URL is one
    line now, not after the patience); a trial, started mid-sweep, waits for the database to open it too.
    `heartbeat`: RDBStorage's heartbeat_interval, grace_period and heartbeat_stale_trial_callback."""
    import optuna

    def opened():
        return optuna.storages.get_storage(optuna.storages.RDBStorage(url, **(heartbeat or {})))

    inner = retried(opened, url, patience_s) if wait_to_open else opened()
    return patient_storage_class()(inner, url, patience_s)
