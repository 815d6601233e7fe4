"""MLflow at the edges of the stages: one run per training run, in the repository's store.

The default store is sqlite `mlflow.db` with artifacts in `mlartifacts/`, both
at the repository root. Queued DVC experiments run in temporary copies of the
repository, so the root comes from DVC_ROOT, never from the working folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from filelock import FileLock
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_rounds.runtime import run_conditions
from cifar_rounds.params import Params

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call


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


def run_name(params: Params) -> str:
    return os.environ.get("DVC_EXP_NAME") or params.tracking.run_name


def git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def experiment_id(client: MlflowClient, name: str, root: Path, local_store: bool) -> str:
    """Get or create the experiment; local stores keep artifacts at the root, absolute."""
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
    local = uri.startswith("sqlite:")
    # Two queue workers starting at once would both run the sqlite schema migration.
    with FileLock(str(root / f".{STORE_FILE}.lock")) if local else nullcontext():
        client = MlflowClient(uri)
        return client, experiment_id(client, params.tracking.experiment_name, root, local)


def run_tags(params: Params, device: torch.device) -> dict[str, str]:
    root = repo_root()
    commit = git_commit(Path.cwd())
    return {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc_root": str(root),
        **run_conditions(params.train.precision, device),
        "torch_version": torch.__version__,
        "params_digest": params.digest(),
    }


class Tracker:
    """One MLflow run: params and tags once, metrics per epoch, artifacts at the end."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
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

    @classmethod
    def start(cls, params: Params, device: torch.device, resume_run_id: str | None = None) -> Tracker:
        client, exp_id = open_client(params)
        if resume_run_id and _run_exists(client, resume_run_id):
            client.update_run(resume_run_id, status="RUNNING")
            return cls(client, resume_run_id)
        tags = run_tags(params, device)
        # under `mlflow run`, the run it opened is this run
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            client.update_run(run_id, status="RUNNING", name=run_name(params))
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            run_id = client.create_run(exp_id, run_name=run_name(params), tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.flat().items()])
        return cls(client, run_id)

    @classmethod
    def attach(cls, params: Params, run_id: str) -> Tracker:
        client, _ = open_client(params)
        return cls(client, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int, series: dict[str, dict[int, float]] | None = None) -> None:
        """Metrics at one step, plus whole series (key -> {step: value}), in one batch where MLflow allows.

        One batch is one transaction in MLflow's stores, so an epoch is logged entirely or not at all.
        """
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        batch += [Metric(k, float(v), now, s) for k, values in (series or {}).items() for s, v in values.items()]
        with self._write():
            for i in range(0, len(batch), MAX_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_BATCH])

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` (0 if none): where a resumed run picks up logging."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def log_artifact(self, path: Path, artifact_path: str | None = None, name: str | None = None) -> None:
        """Log a file, optionally under another name."""
        if name is None or name == path.name:
            with self._write():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp, self._write():
            renamed = Path(tmp) / name
            shutil.copyfile(path, renamed)
            self.client.log_artifact(self.run_id, str(renamed), artifact_path)

    def log_pytorch_model(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """Save as an MLflow model in the `pt2` (torch.export) format: no pickled code to trust."""
        import mlflow.pytorch

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(
                model, Path(tmp) / "model", serialization_format="pt2", input_example=example.numpy()
            )
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "model"), "model")

    def finish(self, status: str = "FINISHED") -> None:
        with self._write():
            self.client.set_terminated(self.run_id, status)


class NullTracker:
    """What ranks other than 0 log to: nothing (so the training loop needs no rank checks)."""

    run_id = None
    writing = False

    def log_metrics(self, metrics, step, series=None) -> None: ...
    def last_step(self, key: str) -> int:
        return 0
    def log_artifact(self, path, artifact_path=None, name=None) -> None: ...
    def log_pytorch_model(self, model, example) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


@contextmanager
def terminated_on_exit(tracker: Tracker) -> Iterator[Tracker]:
    """End the run FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.

    Ctrl-C (unless ignored, as in background jobs) and SIGTERM raise KeyboardInterrupt at once,
    or, during a store write, when the write is done.
    """

    def interrupt(signum, frame) -> None:
        if tracker.writing:
            tracker.pending_signal = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    handled = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        tracker.finish(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        tracker.finish(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
