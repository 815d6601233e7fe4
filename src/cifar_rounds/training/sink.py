"""Where each epoch's record goes: checkpoint, history, summary, MLflow and the console.

The training loop hands every epoch to one sink. Rank 0 writes through a `RunSink`;
other ranks get a `NullSink`, so the loop has no rank checks. The order within an
epoch is fixed: checkpoint first, then history, then MLflow; a kill in between is
repaired on resume (`backfill`). A finished run is finalised once: if a kill lands
during its final logging or before the run has ended, the next start completes that
logging, ends the run and trains nothing.
"""

from __future__ import annotations

import csv
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from mlflow.entities import DatasetInput

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.files import atomic_path, write_json
from cifar_rounds.core.names import CHECKPOINT_ARTIFACTS, PARAMS_ARTIFACTS
from cifar_rounds.core.params import PARAMS_FILE, Params
from cifar_rounds.tracking.lifecycle import terminated_on_exit
from cifar_rounds.tracking.run import NullTracker, Tracker
from cifar_rounds.training.checkpoint import Outputs, Progress, Resume, best_weights, load_checkpoint, save_atomic
from cifar_rounds.training.model import build_model
from cifar_rounds.training.pace import finish_line

HISTORY_FIELDS = (
    "epoch",
    "learning_rate",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "train_val_accuracy_gap",
    "grad_norm_mean",
    "epoch_time_s",
    "images_per_s",
    "peak_memory_mb",
    "noise_scale",
    "lambda_max",
    "hessian_trace",
    "stability_bound",  # diagnostics; blank when off or not due
)
RESUMABLE_SECTIONS = ("diagnostics", "tracking")  # may change between a kill and a resume: recorded


def write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def best_artifact_name(epoch: int) -> str:
    return f"best-epoch-{epoch:03d}.pt"


def epoch_line(record: dict, num_epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{num_epochs} lr {record['learning_rate']:.4g} "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
        f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | {record['images_per_s']:.0f} img/s"
    )


def epoch_bar(total: int, done: int):
    """A tqdm bar over epochs on a terminal; None elsewhere (epoch lines are printed instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="epochs", unit="epoch", dynamic_ncols=True)


class NullSink:
    """What ranks other than 0 write: nothing."""

    run_id = None

    def running(self) -> AbstractContextManager:
        return nullcontext()

    def tag(self, tags: dict[str, str]) -> None: ...

    def epoch(self, progress: Progress, record: dict, state: dict, best: dict | None) -> None: ...

    def finish(self, progress: Progress, state: dict, summary: dict) -> None: ...

    def finalize(self, progress: Progress, state: dict, summary: dict) -> None: ...


class RunSink:
    """Rank 0's outputs of one training run."""

    def __init__(self, tracker: Tracker | NullTracker, params: Params, out: Outputs, num_classes: int) -> None:
        self.tracker, self.params, self.out, self.num_classes = tracker, params, out, num_classes
        self.bar = None
        self.started: float | None = None  # until this process's first epoch is printed

    @property
    def run_id(self) -> str | None:
        """The MLflow run this training logs to; None when it logs nothing (a finalised run's rebuild)."""
        return self.tracker.run_id

    @classmethod
    def open(
        cls,
        params: Params,
        out: Outputs,
        num_classes: int,
        conditions: dict[str, str],
        progress: Progress,
        resume: Resume,
        datasets: list[DatasetInput],
    ) -> RunSink:
        """Start or continue the MLflow run; record what changed since the checkpoint; log what it lacks."""
        if progress.finalized:  # nothing left to log: rebuild files without touching the store
            print(f"train: {out.last} holds a finished run; rebuilding its outputs without training")
            return cls(NullTracker(), params, out, num_classes)
        tracker = Tracker.start(params, conditions, progress.run_id)
        sink = cls(tracker, params, out, num_classes)
        tracker.supersede(
            resume.superseded_run, f"superseded: new data, model, train or sweep params; fresh run {tracker.run_id}"
        )
        if progress.epoch:
            print(
                f"train: resuming from {out.last} after epoch {progress.epoch}"
                + (" (training finished; completing its final logging)" if progress.finished else "")
            )
            sink._record_changed_settings(progress)
        tracker.log_artifact(PARAMS_FILE)  # the round's exact params, for reports built from MLflow alone
        tracker.log_inputs(datasets)
        progress.run_id = tracker.run_id
        progress.settings = {s: params.digest(s) for s in RESUMABLE_SECTIONS}
        sink._backfill(progress)
        sink.bar = epoch_bar(params.train.num_epochs, progress.epoch) if not progress.finished else None
        return sink

    def _record_changed_settings(self, progress: Progress) -> None:
        changed = [s for s in RESUMABLE_SECTIONS if progress.settings.get(s) not in (None, self.params.digest(s))]
        if changed:
            print(f"train: {', '.join(changed)} changed since epoch {progress.epoch}; continuing with the new values")
            self.tracker.set_tags({f"changed_after_epoch.{s}": str(progress.epoch) for s in changed})
            self.tracker.log_artifact(PARAMS_FILE, PARAMS_ARTIFACTS, f"from-epoch-{progress.epoch + 1:03d}.yaml")

    def _backfill(self, progress: Progress) -> None:
        """Log the checkpointed epochs this run lacks: after a kill between checkpoint and logging, or in a new run."""
        logged = self.tracker.last_step("train_loss")
        for record in progress.history:
            if record["epoch"] > logged:
                last = record["epoch"] == progress.epoch
                self._log_epoch(record, progress.last_grad_norm_steps if last else {})

    def _log_epoch(self, record: dict, series: dict[int, float]) -> None:
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        self.tracker.log_metrics(metrics, int(record["epoch"]), {"grad_norm_step": series})

    def running(self) -> AbstractContextManager:
        """The run ends FINISHED, FAILED or KILLED with the block; this process's first epoch starts."""
        self.started = time.monotonic()
        return terminated_on_exit(self.tracker)

    def tag(self, tags: dict[str, str]) -> None:
        if tags:
            self.tracker.set_tags(tags)

    def epoch(self, progress: Progress, record: dict, state: dict, best: dict | None) -> None:
        """Checkpoint first, then history and logging: a kill in between is repaired by `_backfill`."""
        if best is not None:
            save_atomic(best, self.out.best)
        save_atomic(state, self.out.last)
        write_history(progress.history, self.out.history)
        self._log_epoch(record, progress.last_grad_norm_steps)
        print(epoch_line(record, self.params.train.num_epochs), flush=True)
        if self.started is not None:  # this process's first epoch, all of it: at its pace, when the last ends
            left = 0 if progress.finished else self.params.train.num_epochs - progress.epoch
            took = time.monotonic() - self.started
            print(finish_line(progress.epoch, took, left, datetime.now(timezone.utc)), flush=True)
            self.started = None
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, progress: Progress, state: dict, summary: dict) -> None:
        """Rebuild what is derived from the state and complete the final logging (the run then ends)."""
        if self.bar is not None:
            self.bar.close()
        train = self.params.train
        if summary["early_stopped"]:
            print(f"early stop: no {train.monitor} improvement > {train.min_delta} in {train.patience} epochs")
        write_history(progress.history, self.out.history)
        self._ensure_best(state, summary["best_epoch"])
        if not progress.finalized:
            self._log_final(summary, state)

    def finalize(self, progress: Progress, state: dict, summary: dict) -> None:
        """Once the run has ended: the state marked final, then the summary.

        Marked only now, so that a kill before the run's end leaves a state whose next start
        completes the final logging and ends the run, rather than one that trusts it ended.
        """
        if not progress.finalized:
            progress.finalized = True
            save_atomic({**state, "progress": asdict(progress)}, self.out.last)
        write_json(summary, self.out.summary)

    def _ensure_best(self, state: dict, best_epoch: int) -> None:
        """best.pt from the state (best is last) or from the run's logged copy; else say what to do."""
        if self.out.best.exists():
            return
        if best_epoch == state["progress"]["epoch"]:
            save_atomic(best_weights(state["model"], best_epoch, self.params.model.width), self.out.best)
            return
        run_id = state["progress"]["run_id"]
        try:
            tracker = self.tracker if isinstance(self.tracker, Tracker) else Tracker.attach(self.params, run_id)
            path = tracker.client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{best_artifact_name(best_epoch)}")
        except Exception:  # not logged, store gone: the weights are lost either way
            raise StageError(
                f"{self.out.best} is missing and epoch {best_epoch}'s weights are neither in "
                f"{self.out.last} nor in MLflow; delete {self.out.last} to retrain"
            ) from None
        save_atomic(load_checkpoint(Path(path)), self.out.best)
        print(f"train: rebuilt {self.out.best} from the run's logged copy")

    def _log_final(self, summary: dict, state: dict) -> None:
        """Checkpoints (named by epoch), the history, and the best model as a LoggedModel and registered version."""
        t = self.tracker
        # logged here only (evaluate does not repeat them), once however often the final logging restarts
        t.log_new_metrics(
            {"best_epoch": summary["best_epoch"], "stopped_epoch": summary["stopped_epoch"]}, summary["stopped_epoch"]
        )
        t.log_artifact(self.out.best, CHECKPOINT_ARTIFACTS, best_artifact_name(summary["best_epoch"]))
        t.log_artifact(self.out.last, CHECKPOINT_ARTIFACTS, f"last-epoch-{summary['stopped_epoch']:03d}.pt")
        t.log_artifact(self.out.history)
        if self.params.tracking.log_model:
            # exported in the default layout: torch.export's weight packaging takes channels-last weights
            # for slices of a larger tensor and warns ("No complete tensor found in the group!")
            best = build_model(self.params.model.width, self.num_classes, torch.device("cpu"), torch.contiguous_format)
            best.load_state_dict(load_checkpoint(self.out.best)["model"])
            # batch 2: torch.export specialises a batch dimension of size 1
            t.log_model(best.eval(), torch.zeros(2, 3, 32, 32), self.params.tracking.registered_model)
