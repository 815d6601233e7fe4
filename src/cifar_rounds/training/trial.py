"""The training's side of a sweep, a sink like the MLflow run: each epoch reported to the Optuna trial, which may
stop it.

A run is a trial when `sweep.study` and `sweep.trial` are set in params.yaml (the
sweep's worker sets them). Outside a sweep, `open_trial` returns `NoTrial`, which
imports nothing and costs nothing. A pruned trial stops like an early stop: its
checkpoint and history are kept. The worker that runs the trial tells the study its
end once the experiment is saved (search/worker.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import SweepParams
from cifar_rounds.core.urls import missing_driver
from cifar_rounds.tracking.store import repo_root, root_sqlite_url
from cifar_rounds.tracking.study_storage import patient_storage, shown
from cifar_rounds.training.pruners import Pruner

STUDY_FILE = "optuna.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attributes the sweep sets, the trials read
OBJECTIVE_ATTR = "objective"
PRUNED_ATTR = "pruned"  # trial attributes the train stage sets at its end
BEST_EPOCH_ATTR = "best_epoch"  # the epoch train.monitor selected: the checkpoint evaluation uses
PRUNER_ATTR = "pruner"
SWEEP_TAG, TRIAL_TAG, STATE_TAG = "sweep", "sweep.trial", "sweep.trial_state"


def study_storage(url: str | None, root: Path) -> str:
    """The storage URL: the given one, or sqlite optuna.db at the repository root (relative sqlite paths from it)."""
    return f"sqlite:///{root / STUDY_FILE}" if url is None else root_sqlite_url(url, root)


class NoTrial:
    """Not a trial: nothing reported, never pruned."""

    def tags(self) -> dict[str, str]:
        return {}

    def report(self, epoch: int, record: dict) -> bool:
        return False

    def finish(self, pruned: bool, best_epoch: int) -> str | None:
        return None


class StudyTrial:
    """One running Optuna trial, fed by the training loop."""

    def __init__(self, study, trial, number: int, metric: str) -> None:
        self.study, self.trial, self.number, self.metric = study, trial, number, metric

    def tags(self) -> dict[str, str]:
        parent = self.study.user_attrs.get(PARENT_RUN_ATTR)
        return {
            SWEEP_TAG: self.study.study_name,
            TRIAL_TAG: str(self.number),
            **({"mlflow.parentRunId": parent} if parent else {}),
        }

    def report(self, epoch: int, record: dict) -> bool:
        """Report the epoch's objective; True when the pruner says stop."""
        value = float(record[self.metric])
        if not math.isfinite(value):
            return False  # a diverged run is stopped by the loop itself
        import optuna

        try:
            self.trial.report(value, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker was lost: Optuna failed it (and retries it)
            raise StageError(
                f"sweep: trial {self.number} of {self.study.study_name!r} was ended "
                f"({self.study.trials[self.number].state.name}) while this run trained it; its result is not recorded"
            ) from None
        return bool(self.trial.should_prune())

    def finish(self, pruned: bool, best_epoch: int) -> str:
        """Record how training ended and which epoch the monitor chose; the worker tells the study once the
        experiment is saved."""
        self.trial.set_user_attr(BEST_EPOCH_ATTR, best_epoch)
        self.trial.set_user_attr(PRUNED_ATTR, pruned)
        return "PRUNED" if pruned else "COMPLETE"


def open_trial(sp: SweepParams, patience_s: float) -> NoTrial | StudyTrial:
    """The trial params.yaml names, if it is still running; one line and no reporting otherwise. Its storage
    calls wait for an unreachable database for up to `patience_s` seconds."""
    if sp.study is None:
        return NoTrial()
    import optuna
    from pydantic import TypeAdapter

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = study_storage(sp.storage, repo_root())
    try:
        storage = patient_storage(url, patience_s, wait_to_open=True)  # the database may restart mid-sweep
        study_id = storage.get_study_id_from_name(sp.study)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, sp.trial)
    except KeyError:
        raise StageError(f"sweep: study {sp.study!r} has no trial {sp.trial} in {shown(url)}") from None
    except StageError:
        raise
    except Exception as error:  # not a database, or its driver not installed: say which, in one line
        line = missing_driver(error, "sweep.storage", url)
        if line is not None:
            raise StageError(line) from None
        raise StageError(f"sweep.storage: cannot open {shown(url)} ({str(error).splitlines()[0][:160]})") from None
    attrs = storage.get_study_user_attrs(study_id)
    pruner = TypeAdapter(Pruner).validate_python(attrs[PRUNER_ATTR]).build()
    study = optuna.Study(study_name=sp.study, storage=storage, pruner=pruner)
    frozen = storage.get_trial(trial_id)
    if frozen.state != optuna.trial.TrialState.RUNNING:
        print(
            f"sweep: trial {sp.trial} of {sp.study!r} is already {frozen.state.name}; training without reporting to it"
        )
        return NoTrial()
    return StudyTrial(study, optuna.trial.Trial(study, trial_id), sp.trial, attrs[OBJECTIVE_ATTR]["metric"])
