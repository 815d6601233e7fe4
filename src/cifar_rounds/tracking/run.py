"""MLflow at the edges of the stages: one run per training run, in the repository's store (`store`).

The run gets params, tags and datasets once, metrics per epoch, artifacts and the model at
the end; each write waits while the store is busy (`patience.patiently`) and cannot be cut in
half by Ctrl-C or SIGTERM, which end the run KILLED.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    Metric,
    Param,
    RunTag,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import Params
from cifar_rounds.tracking.patience import after_a_lost_insert_race, patiently
from cifar_rounds.tracking.registry import log_and_register, ready_model_id, run_version
from cifar_rounds.tracking.store import git_commit, open_client, repo_root

if TYPE_CHECKING:
    import torch

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
END_REASON_TAG = "cifar_rounds.end_reason"
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # split part -> MLflow input context
T = TypeVar("T")


def run_name(params: Params) -> str:
    return os.environ.get("DVC_EXP_NAME") or params.tracking.run_name


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
        "preset": params.tracking.preset or "",
        "planned_seeds": str(params.tracking.planned_seeds or ""),
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

    def log_new_metrics(self, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
        """`log_metrics` of those values the run does not already hold at `step`.

        A stage that is rerun (after a kill between its logging and DVC's lock file, or forced)
        logs nothing twice; a value that changed is logged, so the latest is the last measured.
        """
        held = {key: self.values_at(key, step) for key in metrics}
        new = {k: v for k, v in metrics.items() if not any(same_value(float(v), h) for h in held[k])}
        if new:
            self.log_metrics(new, step, model_id=model_id)

    def values_at(self, key: str, step: int) -> list[float]:
        """The values logged for `key` at `step`."""
        history = patiently(
            lambda: self.client.get_metric_history(self.run_id, key), "reading the run", self.patience_s
        )
        return [m.value for m in history if m.step == step]

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` (0 if none): where a resumed run picks up logging."""
        history = patiently(
            lambda: self.client.get_metric_history(self.run_id, key), "reading the run", self.patience_s
        )
        return max((m.step for m in history), default=0)

    def log_inputs(self, datasets: list[DatasetInput]) -> None:
        """The run's datasets; logging the same ones again adds nothing, and a lost race to add one is retried."""
        log = lambda: self.client.log_inputs(self.run_id, datasets=datasets)  # noqa: E731
        self._call("logging the datasets", lambda: after_a_lost_insert_race(log))

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
        """The best model as this run's LoggedModel and one version of `registered_model` (see `registry`)."""
        log_and_register(self.client, self.run_id, self._call, model, example, registered_model, self.patience_s)

    def version(self, registered_model: str) -> ModelVersion | None:
        """This run's version of `registered_model`, or None."""
        return run_version(self.client, registered_model, self.run_id, self.patience_s)

    def logged_model_id(self) -> str | None:
        """The id of this run's READY LoggedModel (its best model), or None when it has none."""
        return ready_model_id(self.client, self.run_id, self._call)

    def set_model_tags(self, model_id: str, tags: dict[str, str]) -> None:
        self._call("tagging the model", lambda: self.client.set_logged_model_tags(model_id, tags))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status))


def same_value(a: float, b: float) -> bool:
    """Equal, or both NaN (MLflow stores NaN as it was logged)."""
    return a == b or (math.isnan(a) and math.isnan(b))


class NullTracker:
    """A tracker that records nothing: for a finalized checkpoint, whose run is complete in MLflow and whose
    files are rebuilt from `last.pt` without touching the store. (Ranks other than 0 get a `NullSink`.)"""

    run_id = None
    writing = False

    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics, step, series=None) -> None: ...
    def log_new_metrics(self, metrics, step, model_id=None) -> None: ...
    def last_step(self, key: str) -> int:
        return 0

    def log_inputs(self, datasets) -> None: ...
    def log_artifact(self, path, artifact_path=None, name=None) -> None: ...
    def log_model(self, model, example, registered_model) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def _find_run(client: MlflowClient, run_id: str | None, patience_s: float):
    if not run_id:
        return None
    try:
        return patiently(lambda: client.get_run(run_id), "reading the run", patience_s)
    except StageError:
        return None
