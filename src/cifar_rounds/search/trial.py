"""The train stage's side of a sweep: report each epoch to the Optuna trial, stop when it is pruned.

A run is a trial when `sweep.study` and `sweep.trial` are set in params.yaml (the
sweep driver sets them). Outside a sweep, `open_trial` returns `NoTrial`, which
imports nothing and costs nothing. A pruned trial stops like an early stop: its
checkpoint and history are kept. The study learns the trial's end from the sweep
driver (`conclude`), once the whole experiment has succeeded; the pruner counts a trial
that trained to its end among the finished ones already (`TrainedAsFinished`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import SweepParams
from cifar_rounds.core.urls import missing_driver
from cifar_rounds.search.storage import patient_storage, shown
from cifar_rounds.tracking.store import repo_root, root_sqlite_url

STUDY_FILE = "optuna.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attributes the driver sets, the trials read
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
        except optuna.exceptions.UpdateFinishedTrialError:  # the sweep driver took it for lost
            raise StageError(
                f"sweep: trial {self.number} of {self.study.study_name!r} was ended "
                f"({self.study.trials[self.number].state.name}) while this run trained it; its result is not recorded"
            ) from None
        return bool(self.trial.should_prune())

    def finish(self, pruned: bool, best_epoch: int) -> str:
        """Record how training ended and which epoch the monitor chose; the driver tells the study once the
        whole experiment has succeeded."""
        self.trial.set_user_attr(BEST_EPOCH_ATTR, best_epoch)
        self.trial.set_user_attr(PRUNED_ATTR, pruned)
        return "PRUNED" if pruned else "COMPLETE"


class TrainedAsFinished:
    """The study's pruner, shown the trials whose training ended unpruned as the finished trials they will be.

    The driver tells the study a trial's end once its whole experiment has succeeded: after its evaluation
    and DVC's bookkeeping, a minute or more after training, or, with the driver stopped, not before it runs
    again. The next trials train meanwhile, and a median pruner that saw only the concluded trials would let
    them run unpruned (it waits for `startup_trials` finished ones). The values such a trial reported are
    final, so they are references as good as a concluded trial's.
    """

    def __init__(self, pruner) -> None:
        self.pruner = pruner

    def prune(self, study, trial) -> bool:
        return self.pruner.prune(_TrainedShownFinished(study), trial)


class _TrainedShownFinished:
    """A study whose trials that trained to their end unpruned read COMPLETE; the rest is the study's own."""

    def __init__(self, study) -> None:
        self.study = study

    def __getattr__(self, name: str):
        return getattr(self.study, name)

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        import optuna

        running, complete = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
        shown = []
        for trial in self.study.get_trials(deepcopy=deepcopy):
            if trial.state == running and BEST_EPOCH_ATTR in trial.user_attrs and not trial.user_attrs.get(PRUNED_ATTR):
                trial = copy.copy(trial)
                trial.state = complete
            if states is None or trial.state in states:
                shown.append(trial)
        return shown


def conclude(study, number: int) -> str:
    """Tell the study how a trial whose experiment succeeded ended: PRUNED, or COMPLETE with the objective
    it reported at the epoch train.monitor selected as best (not the best over all epochs: that epoch's
    checkpoint is what evaluation uses); FAIL if it reported no finite value for that epoch."""
    import optuna

    trial = study.get_trials(deepcopy=False)[number]
    value = trial.intermediate_values.get(trial.user_attrs.get(BEST_EPOCH_ATTR))
    if trial.user_attrs.get(PRUNED_ATTR):
        state, value = optuna.trial.TrialState.PRUNED, None
    elif value is not None and math.isfinite(value):
        state = optuna.trial.TrialState.COMPLETE
    else:
        state, value = optuna.trial.TrialState.FAIL, None
    study.tell(number, value, state=state, skip_if_finished=True)
    return state.name


def open_trial(sp: SweepParams, patience_s: float) -> NoTrial | StudyTrial:
    """The trial params.yaml names, if it is still running; one line and no reporting otherwise. Its storage
    calls wait for an unreachable database for up to `patience_s` seconds."""
    if sp.study is None:
        return NoTrial()
    import optuna
    from pydantic import TypeAdapter

    from cifar_rounds.search.spec import Objective, Pruner

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
    pruner = TrainedAsFinished(TypeAdapter(Pruner).validate_python(attrs[PRUNER_ATTR]).build())
    study = optuna.Study(study_name=sp.study, storage=storage, pruner=pruner)
    frozen = storage.get_trial(trial_id)
    if frozen.state != optuna.trial.TrialState.RUNNING:
        print(
            f"sweep: trial {sp.trial} of {sp.study!r} is already {frozen.state.name}; training without reporting to it"
        )
        return NoTrial()
    objective = Objective.model_validate(attrs[OBJECTIVE_ATTR])
    return StudyTrial(study, optuna.trial.Trial(study, trial_id), sp.trial, objective.metric)
