"""MLflow at the edges of the stages: one run per training run, in the repository's store.

The default store is sqlite `mlflow.db` with artifacts in `mlartifacts/`, both
at the repository root. Queued DVC experiments run in temporary copies of the
repository, so the root comes from DVC_ROOT, never from the working folder.

A busy store (a locked sqlite file, a server that stops answering) is waited for,
with backoff, for up to `tracking.store_patience_s` per write, with one line
printed; past that the stage stops with one line, its checkpoint already on disk.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from filelock import FileLock
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.names import LOGGED_MODEL
from cifar_rounds.core.params import Params

if TYPE_CHECKING:
    import torch

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
HEALTH_TIMEOUT_S = 5.0  # a tracking server must answer its health check within this, seconds
END_REASON_TAG = "cifar_rounds.end_reason"
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # split part -> MLflow input context
VERSION_TAGS = ("round", "seed", "dvc_exp_name", "git_commit")  # run tags each registered version carries
T = TypeVar("T")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params, root: Path) -> str:
    """params > $MLFLOW_TRACKING_URI > sqlite store at the repository root.

    A relative sqlite path is taken from the repository root, not from the
    working folder (a queued experiment's temporary copy).
    """
    uri = params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{root / STORE_FILE}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri.removeprefix(prefix)).is_absolute():
        return f"{prefix}{root / uri.removeprefix(prefix)}"
    return uri


def uri_source(params: Params) -> str:
    """Where the tracking URI came from, for error messages."""
    if params.tracking.tracking_uri:
        return "tracking.tracking_uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store"


def run_name(params: Params) -> str:
    return os.environ.get("DVC_EXP_NAME") or params.tracking.run_name


def git_commit(root: Path) -> str:
    """HEAD's commit, or "unknown" outside a repository or without a git binary."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def transient(error: Exception) -> bool:
    """A store error that waiting can cure: a locked sqlite file, an unreachable or overloaded server."""
    text = str(error)
    return getattr(error, "error_code", "") == "TEMPORARILY_UNAVAILABLE" or any(
        s in text for s in ("database is locked", "Max retries exceeded", "Connection refused", "503")
    )


def patiently(call: Callable[[], T], what: str, patience_s: float) -> T:
    """`call()`, retried with backoff while the store is busy, for up to `patience_s` seconds."""
    deadline, delay = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return call()
        except MlflowException as error:
            first = str(error).strip().splitlines()[0][:160]
            if not transient(error):
                raise StageError(f"tracking: {what} failed ({first})") from None
            if time.monotonic() + delay > deadline:
                raise StageError(
                    f"tracking: the MLflow store stayed unavailable for {patience_s:.0f} s "
                    f"({first}); the last checkpoint is safe: rerun to resume"
                ) from None
            if delay == 0.5:
                print(
                    f"tracking: the MLflow store is busy ({first}); retrying for up to "
                    f"{patience_s:.0f} s (tracking.store_patience_s)",
                    flush=True,
                )
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def check_reachable(uri: str, source: str) -> None:
    """A tracking server answers its health check within seconds, or the run does not start."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StageError(
            f"{source}: the MLflow server {uri} is not reachable ({reason}); "
            "start it, or unset the URI to use the local store"
        ) from None


def rebase_moved_store(db: Path, root: Path, patience_s: float) -> None:
    """After the repository was moved or copied, point the local store's artifact paths into it.

    Experiments and runs keep absolute artifact URIs; a copy would otherwise keep writing
    into the original (or fail where it is gone). Only the default store at the root is rebased.
    """
    here = (root / ARTIFACTS_DIR).as_uri()
    with patient_sqlite(db, patience_s) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return
        for (old,) in con.execute("SELECT artifact_location FROM experiments").fetchall():
            if old and old.endswith(f"/{ARTIFACTS_DIR}") and old != here and old.startswith("file://"):
                _replace_prefix(con, tables, old, here)
                print(f"tracking: the repository moved; artifact paths now under {root / ARTIFACTS_DIR}")


@contextmanager
def patient_sqlite(db: Path, patience_s: float) -> Iterator[sqlite3.Connection]:
    """A connection that waits up to `patience_s` for another process's lock, saying so once."""
    con = sqlite3.connect(db, timeout=0.5)
    try:
        con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
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
    columns = {"experiments": "artifact_location", "runs": "artifact_uri", "logged_models": "artifact_location"}
    for table, column in columns.items():
        if table in tables:
            con.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? OR {column} LIKE ?",
                (new, len(old) + 1, old, old + "/%"),
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
    with FileLock(str(root / f".{STORE_FILE}.lock")) if local else nullcontext():
        try:
            if default_store and (root / STORE_FILE).exists():
                rebase_moved_store(root / STORE_FILE, root, params.tracking.store_patience_s)
            client = MlflowClient(uri)
            return client, patiently(
                lambda: experiment_id(client, params.tracking.experiment_name, root, local),
                f"opening experiment {params.tracking.experiment_name!r}",
                params.tracking.store_patience_s,
            )
        except sqlite3.OperationalError as error:
            if "locked" not in str(error):
                raise StageError(
                    f"{uri.removeprefix('sqlite:///')}: not a usable MLflow store ({error}); "
                    "move it away to start a new store"
                ) from None
            raise StageError(
                f"tracking: the MLflow store stayed unavailable for {params.tracking.store_patience_s:.0f} s "
                "(database is locked); the last checkpoint is safe: rerun to resume"
            ) from None
        except (sqlite3.DatabaseError, MlflowException) as error:
            first = str(error).strip().splitlines()[0][:160]
            raise StageError(
                f"{uri.removeprefix('sqlite:///')}: not a usable MLflow store ({first}); "
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


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (another worker may create it at the same moment)."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def run_version(client: MlflowClient, registered_model: str, run_id: str, patience_s: float) -> ModelVersion | None:
    """The version of `registered_model` that run `run_id` registered, or None."""
    found = patiently(
        lambda: client.search_model_versions(f"name = '{registered_model}' AND run_id = '{run_id}'"),
        "reading the registry",
        patience_s,
    )
    return found[0] if found else None


def dataset_inputs(url: str, digest: str, sizes: dict[str, int]) -> list[DatasetInput]:
    """The split's parts as MLflow dataset inputs, each with its context.

    Source: `data.url`. Digest: the split file's MD5, the hash DVC records for it in dvc.lock, so a
    dataset in MLflow and a split in DVC are one thing, and a re-split is a new dataset.
    """
    source_type, source = ("http", {"url": url}) if url.startswith(("http://", "https://")) else ("local", {"uri": url})
    return [
        DatasetInput(
            Dataset(
                f"cifar10-{part}",
                digest,
                source_type,
                json.dumps(source),
                profile=json.dumps({"num_rows": sizes[part]}),
            ),
            [InputTag("mlflow.data.context", context)],
        )
        for part, context in DATASET_CONTEXTS.items()
    ]


def run_tags(params: Params, conditions: dict[str, str]) -> dict[str, str]:
    root = repo_root()
    commit = git_commit(Path.cwd())
    return {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc_root": str(root),
        "round": params.tracking.round,
        "seed": str(params.train.seed),
        **conditions,
        "torch_version": importlib.metadata.version("torch"),
        "params_digest": params.digest(),
    }


class Tracker:
    """One MLflow run: params, tags and datasets once, metrics per epoch, artifacts and the model at the end."""

    def __init__(self, client: MlflowClient, run_id: str, patience_s: float) -> None:
        self.client, self.run_id, self.patience_s = client, run_id, patience_s
        self.writing = False  # inside a store write: an interrupt waits for its end (terminated_on_exit)
        self.pending_signal: int | None = None

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A store write that an interrupt cannot cut in half; a signal that came meanwhile is raised after it.

        A KeyboardInterrupt inside an sqlite transaction can leave the store locked, and the
        run could then not be marked KILLED.
        """
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending_signal is not None:
            signum, self.pending_signal = self.pending_signal, None
            raise KeyboardInterrupt(f"signal {signum}")

    def _call(self, what: str, call: Callable[[], T]) -> T:
        with self._write():
            return patiently(call, what, self.patience_s)

    @classmethod
    def start(cls, params: Params, conditions: dict[str, str], resume_run_id: str | None = None) -> Tracker:
        """Continue `resume_run_id` where it is in this store and experiment; else a new run, replacing it."""
        client, exp_id = open_client(params)
        patience = params.tracking.store_patience_s
        old = _find_run(client, resume_run_id, patience)
        if old is not None and old.info.experiment_id == exp_id:
            tracker = cls(client, old.info.run_id, patience)
            tracker._call(
                "resuming the run", lambda: client.update_run(old.info.run_id, status="RUNNING", name=run_name(params))
            )
            return tracker
        tracker = cls(client, cls._new_run(client, exp_id, params, conditions), patience)
        if old is not None:
            tracker.supersede(
                old.info.run_id,
                f"continued as run {tracker.run_id} in experiment "
                f"{params.tracking.experiment_name!r} (tracking params changed)",
            )
        return tracker

    @staticmethod
    def _new_run(client: MlflowClient, exp_id: str, params: Params, conditions: dict[str, str]) -> str:
        tags, patience = run_tags(params, conditions), params.tracking.store_patience_s
        # under `mlflow run`, the run it opened is this run
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            patiently(
                lambda: client.update_run(run_id, status="RUNNING", name=run_name(params)), "resuming the run", patience
            )
            patiently(
                lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
                "tagging the run",
                patience,
            )
        else:
            run_id = patiently(
                lambda: client.create_run(exp_id, run_name=run_name(params), tags=tags).info.run_id,
                "creating the run",
                patience,
            )
        patiently(
            lambda: client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.flat().items()]),
            "logging params",
            patience,
        )
        return run_id

    @classmethod
    def attach(cls, params: Params, run_id: str) -> Tracker:
        client, _ = open_client(params)
        return cls(client, run_id, params.tracking.store_patience_s)

    def supersede(self, run_id: str | None, reason: str) -> None:
        """End another run of this store that is still RUNNING as KILLED, tagged with why."""
        old = _find_run(self.client, run_id, self.patience_s)
        if old is None or old.info.status != "RUNNING":
            return
        self._call("closing the superseded run", lambda: self.client.set_tag(run_id, END_REASON_TAG, reason))
        self._call("closing the superseded run", lambda: self.client.set_terminated(run_id, "KILLED"))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(
            "tagging the run", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        )

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int,
        series: dict[str, dict[int, float]] | None = None,
        model_id: str | None = None,
    ) -> None:
        """Metrics at one step, plus whole series (key -> {step: value}), in one batch where MLflow allows.

        One batch is one transaction in MLflow's stores, so an epoch is logged entirely or not at all.
        With `model_id`, the step's metrics are also the metrics of that LoggedModel.
        """
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
        batch += [Metric(k, float(v), now, s) for k, values in (series or {}).items() for s, v in values.items()]
        for i in range(0, len(batch), MAX_BATCH):
            self._call("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_BATCH]))

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` (0 if none): where a resumed run picks up logging."""
        history = patiently(
            lambda: self.client.get_metric_history(self.run_id, key), "reading the run", self.patience_s
        )
        return max((m.step for m in history), default=0)

    def log_inputs(self, datasets: list[DatasetInput]) -> None:
        """The run's datasets; logging the same ones again adds nothing."""
        self._call("logging the datasets", lambda: self.client.log_inputs(self.run_id, datasets=datasets))

    def log_artifact(self, path: Path, artifact_path: str | None = None, name: str | None = None) -> None:
        """Log a file, optionally under another name."""
        if name is None or name == path.name:
            self._call("logging an artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))
            return
        with tempfile.TemporaryDirectory() as tmp:
            renamed = Path(tmp) / name
            shutil.copyfile(path, renamed)
            self._call(
                "logging an artifact", lambda: self.client.log_artifact(self.run_id, str(renamed), artifact_path)
            )

    def log_model(self, model: torch.nn.Module, example: torch.Tensor, registered_model: str) -> None:
        """The best model as this run's LoggedModel and one version of `registered_model`, tagged like the run.

        `pt2` format: torch.export, no pickled code to trust. Idempotent: after a kill part-way, the next
        call completes what is missing (a READY model is not logged again, a run never gets two versions).
        """
        if self.version(registered_model) is not None:
            return
        with process_store(self.client.tracking_uri):
            models = self._run_models()
            for m in models:
                if m.status == LoggedModelStatus.PENDING:  # a kill interrupted its upload: it stays incomplete
                    self._call(
                        "closing an interrupted model",
                        lambda: self.client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED),
                    )
            ready = [m.model_id for m in models if m.status == LoggedModelStatus.READY]
            model_id = ready[0] if ready else self._log_logged_model(model, example)
            self._register(model_id, registered_model)

    def _log_logged_model(self, model: torch.nn.Module, example: torch.Tensor) -> str:
        import mlflow.pytorch
        from mlflow.models import infer_signature

        run = self._call("reading the run", lambda: self.client.get_run(self.run_id))
        # created here, not by log_model: it would put a model it creates in the process's active
        # experiment (MLflow's default one here), not in the run's
        model_id = self._call(
            "creating the logged model",
            lambda: self.client.create_logged_model(
                run.info.experiment_id, name=LOGGED_MODEL, source_run_id=self.run_id, params=run.data.params
            ),
        ).model_id
        x = example.numpy()
        signature = infer_signature(x, model(example).detach().numpy())
        # requirements given, not inferred: inference imports the model in a subprocess (about 9 s)
        self._call(
            "logging the model",
            lambda: mlflow.pytorch.log_model(
                model,
                name=LOGGED_MODEL,
                serialization_format="pt2",
                input_example=x,
                signature=signature,
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                run_id=self.run_id,
                model_id=model_id,
            ),
        )
        return model_id

    def _register(self, model_id: str, name: str) -> None:
        tags = self._call("reading the run", lambda: self.client.get_run(self.run_id)).data.tags
        self._call("creating the registered model", lambda: ensure_registered_model(self.client, name))
        self._call(
            "registering the model",
            lambda: self.client.create_model_version(
                name,
                f"models:/{model_id}",
                run_id=self.run_id,
                tags={k: tags.get(k, "") for k in VERSION_TAGS},
                model_id=model_id,
            ),
        )

    def version(self, registered_model: str) -> ModelVersion | None:
        """This run's version of `registered_model`, or None."""
        return run_version(self.client, registered_model, self.run_id, self.patience_s)

    def _run_models(self) -> list[LoggedModel]:
        run = self._call("reading the run", lambda: self.client.get_run(self.run_id))
        return list(
            self._call(
                "reading the run's models",
                lambda: self.client.search_logged_models(
                    [run.info.experiment_id],
                    filter_string=f"source_run_id = '{self.run_id}' AND name = '{LOGGED_MODEL}'",
                ),
            )
        )

    def logged_model_id(self) -> str | None:
        """The id of this run's READY LoggedModel (its best model), or None when it has none."""
        ready = [m.model_id for m in self._run_models() if m.status == LoggedModelStatus.READY]
        return ready[0] if ready else None

    def finish(self, status: str = "FINISHED") -> None:
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status))


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    run_id = None
    writing = False

    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics, step, series=None) -> None: ...
    def last_step(self, key: str) -> int:
        return 0

    def log_inputs(self, datasets) -> None: ...
    def log_artifact(self, path, artifact_path=None, name=None) -> None: ...
    def log_model(self, model, example, registered_model) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


@contextmanager
def system_metrics(uri: str, run_id: str | None, interval_s: float, node: str | None = None) -> Iterator[None]:
    """MLflow's own system metrics of this machine, sampled into `run_id` every `interval_s` while the block runs.

    `node` names the machine in the metric keys (`system/NODE/...`), so that the nodes of a
    torchrun job stay apart in one run. A resumed run continues their steps. 0 or no run: off.
    """
    if interval_s == 0 or run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node, tracking_uri=uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _find_run(client: MlflowClient, run_id: str | None, patience_s: float):
    if not run_id:
        return None
    try:
        return patiently(lambda: client.get_run(run_id), "reading the run", patience_s)
    except StageError:
        return None


@contextmanager
def terminated_on_exit(tracker: Tracker | NullTracker) -> Iterator[None]:
    """End the run FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.

    Ctrl-C (unless ignored, as in background jobs) and SIGTERM raise KeyboardInterrupt at once,
    or, during a store write, when the write is done. Where the store itself failed, the run's
    status is set by the next run of the stage (which resumes it, or ends it as superseded).
    """

    def interrupt(signum, frame) -> None:
        if tracker.writing:
            tracker.pending_signal = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    handled = [signal.SIGTERM] + (
        [signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []
    )
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    try:
        yield
    except KeyboardInterrupt:
        _finish_quietly(tracker, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        _finish_quietly(tracker, RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        tracker.finish(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _finish_quietly(tracker: Tracker | NullTracker, status: str) -> None:
    """Mark the run; if the store is what failed, leave that error as the one reported."""
    try:
        tracker.finish(status)
    except StageError:
        pass
