"""The MLflow store: where it is, a client on it, and a moved repository's paths.

The default store is sqlite `mlflow.db` with artifacts in `mlartifacts/`, both at the
repository root. Experiments run in clones (a sweep's, side-by-side replicates') or DVC's
temporary copies, so the root comes from PROJECT_ENV or DVC_ROOT, never from the working
folder. Every write waits out a busy store (tracking/patience.py).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from cifar_rounds.core.errors import StageError, causes, sqlite_busy
from cifar_rounds.core.params import Params
from cifar_rounds.core.urls import missing_driver, password_refusal, without_password
from cifar_rounds.tracking.patience import patiently

STORE_FILE = "mlflow.db"
STORE_LOCK = f".{STORE_FILE}.lock"  # beside it: held while the store is created, migrated or rebased
ARTIFACTS_DIR = "mlartifacts"
HEALTH_TIMEOUT_S = 5.0  # a tracking server must answer its health check within this, seconds
SQLITE = "sqlite:///"
PROJECT_ENV = "CIFAR_ROUNDS_PROJECT"  # set for the experiments run in a clone: the repository they are run for


def root_sqlite_url(url: str, root: Path) -> str:
    """A relative sqlite URL taken from the repository root (MLflow's store and Optuna's alike); others as given."""
    if url.startswith(SQLITE) and not Path(url.removeprefix(SQLITE)).is_absolute():
        return f"{SQLITE}{root / url.removeprefix(SQLITE)}"
    return url


def repo_root() -> Path:
    """The project's repository: its default stores and its training places. An experiment a worker runs in its
    clone (analysis/clones.py) is the project's: PROJECT_ENV names the repository; else DVC's root, or here."""
    return Path(os.environ.get(PROJECT_ENV) or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params, root: Path) -> str:
    """params > $MLFLOW_TRACKING_URI > sqlite store at the repository root.

    A relative sqlite path is taken from the repository root, not from the
    working folder (a queued experiment's temporary copy).
    """
    uri = params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    refusal = password_refusal(uri)
    if refusal is not None:  # params.yaml's is refused as it is read; the environment's here, before any use
        raise StageError(f"{uri_source(params)}: {refusal}")
    return root_sqlite_url(uri, root) if uri else f"{SQLITE}{root / STORE_FILE}"


def uri_source(params: Params) -> str:
    """Where the tracking URI came from, for error messages."""
    if params.tracking.tracking_uri:
        return "tracking.tracking_uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store"


def git_commit(root: Path) -> str:
    """HEAD's commit, or "unknown" outside a repository or without a git binary."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def check_reachable(uri: str, source: str) -> None:
    """A tracking server answers its health check within seconds, or the run does not start.

    The check sends what MLflow's own requests send (MLFLOW_TRACKING_USERNAME and _PASSWORD or
    ~/.mlflow/credentials, a token, TLS settings): a server behind basic auth that checks /health too
    (a proxy) answers it as it answers the run.
    """
    if not uri.startswith(("http://", "https://")):
        return
    refusal = password_refusal(uri)
    if refusal is not None:
        raise StageError(f"{source}: {refusal}")
    try:
        creds = get_default_host_creds(uri)
        response = http_request(creds, "/health", "GET", max_retries=0, timeout=HEALTH_TIMEOUT_S, raise_on_status=False)
    except MlflowException as error:
        raise StageError(
            f"{source}: the MLflow server {uri} is not reachable ({first_cause(error)}); "
            "start it, or unset the URI to use the local store"
        ) from None
    if response.status_code in (401, 403):
        raise StageError(
            f"{source}: the MLflow server {uri} refused the credentials sent (HTTP {response.status_code}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
        )
    if response.status_code >= 400:
        raise StageError(
            f"{source}: the MLflow server {uri} is not reachable (HTTP {response.status_code} {response.reason}); "
            "start it, or unset the URI to use the local store"
        )


def first_cause(error: BaseException) -> str:
    """The error at the root of `error`'s chain (a refused connection, a timeout), as one line."""
    *_, root = causes(error)
    return (str(root).strip().splitlines() or [type(root).__name__])[0][:160]


# Where MLflow keeps the absolute paths it reads artifacts from (model_versions.source only for
# path-registered versions; ours are `models:/<id>`). Params, tags and dataset sources also hold
# paths, but as a record of what a run used: they are left as they were.
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),  # the Default experiment's too (`<root>/mlruns/0`, a plain path)
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def rebase_moved_store(db: Path, root: Path, patience_s: float) -> bool:
    """After the repository was moved or copied, point the local store's artifact paths into it.

    Experiments, runs, logged models and registered versions keep absolute paths; a copy would
    otherwise read its models from the original, write into it, or fail where it is gone. Only
    the default store at the root is rebased. Returns whether anything had moved.
    """
    here = (root / ARTIFACTS_DIR).as_uri()
    with patient_sqlite(db, patience_s) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return False
        old_roots = {
            old.removesuffix(f"/{ARTIFACTS_DIR}")
            for (old,) in con.execute("SELECT artifact_location FROM experiments").fetchall()
            if old and old.endswith(f"/{ARTIFACTS_DIR}") and old != here and old.startswith("file://")
        }
        for old_root in old_roots:  # as a URI (artifact locations) and as a path (the Default experiment's)
            for before, after in ((old_root, root.as_uri()), (url2pathname(urlparse(old_root).path), str(root))):
                _replace_prefix(con, tables, before, after)
    if old_roots:
        print(f"tracking: the repository moved; artifact paths now under {root / ARTIFACTS_DIR}")
    return bool(old_roots)


def relocate_store(root: Path, patience_s: float) -> bool:
    """The repository's own store rebased after a move or copy, as the stages do on opening it; whether it moved."""
    db = root / STORE_FILE
    if not db.exists():
        raise StageError(f"{db}: no MLflow store here; nothing to relocate")
    with FileLock(str(root / STORE_LOCK)):
        try:
            return rebase_moved_store(db, root, patience_s)
        except sqlite3.DatabaseError as error:
            raise StageError(f"{db}: not a usable MLflow store ({error})") from None


@contextmanager
def patient_sqlite(db: Path, patience_s: float) -> Iterator[sqlite3.Connection]:
    """A connection that waits up to `patience_s` for another process's lock, saying so once."""
    con = sqlite3.connect(db, timeout=0.5)
    try:
        con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError as error:
        if not sqlite_busy(error):
            raise
        con.close()
        print(
            f"tracking: the MLflow store is busy ({error}); retrying for up to {patience_s:.0f} s "
            "(tracking.store_patience_s)",
            flush=True,
        )
        con = sqlite3.connect(db, timeout=patience_s)
    try:
        with con:
            yield con
    finally:
        con.close()


def _replace_prefix(con: sqlite3.Connection, tables: set[str], old: str, new: str) -> None:
    """`old` (a folder) replaced by `new` at the start of every artifact path under it."""
    for table, column in ARTIFACT_COLUMNS:
        if table in tables:
            # substr, not LIKE: a path's own '_' and '%' would be wildcards
            con.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                (new, len(old) + 1, old, len(old) + 1, old + "/"),
            )


def experiment_id(client: MlflowClient, name: str, root: Path, local_store: bool) -> str:
    """Get or create the experiment; local stores keep artifacts at the root."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (root / ARTIFACTS_DIR).as_uri() if local_store else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def open_client(params: Params) -> tuple[MlflowClient, str]:
    """A client on the resolved store and the experiment id, creating both once under a lock."""
    root = repo_root()
    uri = tracking_uri(params, root)
    check_reachable(uri, uri_source(params))
    # MLflow logs each locked-store error with a full trace; `patiently` reports it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    local = uri.startswith("sqlite:")
    default_store = uri == f"sqlite:///{root / STORE_FILE}"
    # Two queue workers starting at once would both run the sqlite schema migration.
    with FileLock(str(root / STORE_LOCK)) if local else nullcontext():
        try:
            if default_store and (root / STORE_FILE).exists():
                rebase_moved_store(root / STORE_FILE, root, params.tracking.store_patience_s)
            client = MlflowClient(uri)
            return client, patiently(
                lambda: experiment_id(client, params.tracking.experiment_name, root, local),
                f"opening experiment {params.tracking.experiment_name!r}",
                params.tracking.store_patience_s,
            )
        except ImportError as error:  # the database's driver, imported as the store opens, is not installed
            line = missing_driver(error, uri_source(params), uri)
            if line is None:
                raise
            raise StageError(line) from None
        except sqlite3.OperationalError as error:
            if not sqlite_busy(error):
                raise StageError(
                    f"{without_password(uri).removeprefix('sqlite:///')}: not a usable MLflow store ({error}); "
                    "move it away to start a new store"
                ) from None
            raise StageError(
                f"tracking: the MLflow store stayed unavailable for {params.tracking.store_patience_s:.0f} s "
                "(database is locked); the last checkpoint is safe: rerun to resume"
            ) from None
        except (sqlite3.DatabaseError, MlflowException) as error:
            first = str(error).strip().splitlines()[0][:160]
            raise StageError(
                f"{without_password(uri).removeprefix('sqlite:///')}: not a usable MLflow store ({first}); "
                "move it away to start a new store"
            ) from None


@contextmanager
def process_store(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at `uri` for the block only.

    Model logging, the sqlite registry and `models:/` URIs read those, not a client's URI, and
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI: the environment is put back after.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
