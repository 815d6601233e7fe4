"""A sweep's study and its MLflow parent run: created once, continued by every sweep and worker that opens it.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or any
database URL, which lets sweeps on several machines share one study). The trials' MLflow
runs are grouped under the sweep's parent run, which holds the sweep file and the report.
A trial's values are tried twice at most: a FAIL whose values were tried again, and a
trial started past the budget by workers that asked at the same moment, do not count.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TypeVar

from mlflow.exceptions import MlflowException

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import Params
from cifar_rounds.core.urls import missing_driver
from cifar_rounds.search.spec import Sweep
from cifar_rounds.tracking.patience import lost_a_creation_race, patiently
from cifar_rounds.tracking.store import open_client, repo_root
from cifar_rounds.tracking.study_storage import patient_storage, shown
from cifar_rounds.training.trial import OBJECTIVE_ATTR, PARENT_RUN_ATTR, PRUNER_ATTR, SWEEP_TAG, study_storage

DIGEST_ATTR = "space_digest"
SURPLUS_ATTR = "surplus"  # a trial started past the budget (told FAIL at once, never trained)
RETRY_HISTORY = "retry_history"  # Optuna's system attribute on a retry: the numbers of the trials it repeats

T = TypeVar("T")


@dataclass
class Driver:
    """One sweep's study, base params and MLflow parent run."""

    sweep: Sweep
    base: Params
    study: object  # optuna.Study
    storage: object  # its optuna storage
    client: object  # MlflowClient
    parent_run_id: str

    def store(self, what: str, call: Callable[[], T]) -> T:
        """A read or write of the tracking store, retried while it is busy, as every other writer's."""
        return patiently(call, what, self.base.tracking.store_patience_s)

    def trial_name(self, number: int) -> str:
        return f"{self.sweep.study}-t{number:03d}"

    def trial_base(self) -> dict[str, object]:
        """What every trial starts from, by dotted name: the baseline preset, the fixed values, the schedule."""
        return {**load_preset(self.sweep.baseline), **self.sweep.trial_values()}

    def trial_values(self, trial) -> dict[str, object]:
        """Everything the experiment runs with: the baseline preset, the fixed values, the trial's and its identity."""
        values = self.trial_base()
        values.update({name: dim.suggest(trial, name) for name, dim in self.sweep.space.items()})
        values.update(
            {
                "tracking.round": self.trial_name(trial.number),
                "tracking.preset": self.sweep.baseline,  # not what the last `rounds run` left in params.yaml
                "tracking.planned_seeds": None,
                # a trial selects values; the registry holds the rounds' replicates, not a version per trial
                # (the trial's checkpoints are logged as for any run)
                "tracking.log_model": False,
                "sweep.study": self.sweep.study,
                "sweep.trial": trial.number,
                "sweep.storage": self.sweep.storage,
            }
        )
        return values


def open_storage(url: str, patience_s: float, heartbeat: dict | None = None, attempts: int = 5):
    """Optuna's storage at `url`, each call retried while the database is unreachable. Sweeps starting
    together on a new database race to create its tables: the one that loses retries, and finds them made."""
    for attempt in range(attempts):
        try:
            return patient_storage(url, patience_s, wait_to_open=False, heartbeat=heartbeat)
        except Exception as error:
            line = missing_driver(error, "sweep storage", url)  # a driver not installed: the package named
            if line is not None:
                raise StageError(line) from None
            if attempt + 1 < attempts and lost_a_creation_race(error):
                time.sleep(1.0 + attempt)
                continue
            first = str(error).splitlines()[0][:160]
            raise StageError(f"sweep storage: cannot open {shown(url)} ({first})") from None


def open_study(sweep: Sweep, url: str, patience_s: float, driver: str = "", heartbeat: dict | None = None):
    """Create or continue the study; a study of the same name with another space is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, patience_s, heartbeat)
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.study,
        direction=sweep.objective.direction,
        pruner=sweep.pruner.build(),
        load_if_exists=True,
    )
    # seeded by the trials so far and by the process: a worker started again must not replay an earlier
    # one's proposals, nor two workers started together (on two machines) propose the same values
    study.sampler = sweep.sampler.build(sweep.space, len(study.trials) + zlib.crc32(driver.encode()) % 100_000)
    known = study.user_attrs.get(DIGEST_ATTR)
    if known is not None and known != sweep.digest():
        raise StageError(
            f"study {sweep.study!r} in {shown(url)} was created from another search space "
            f"(space digest {known}, this file's {sweep.digest()}); choose another `study:` name"
        )
    return study, storage, known is None


def start_parent_run(sweep: Sweep, base: Params, study) -> tuple[object, str]:
    """The sweep's MLflow run, which the trials' runs are grouped under; created once per study."""
    client, exp_id = open_client(base)
    patience = base.tracking.store_patience_s
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None:
        run_id = patiently(
            lambda: client.create_run(exp_id, run_name=sweep.study, tags={SWEEP_TAG: sweep.study}).info.run_id,
            "creating the sweep's run",
            patience,
        )
        patiently(lambda: client.log_dict(run_id, sweep.model_dump(), "sweep.json"), "logging the sweep file", patience)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        # another machine's driver may have made one at the same moment: the study's record wins
        recorded = study.user_attrs.get(PARENT_RUN_ATTR, run_id)  # read again from the storage
        if recorded != run_id:
            patiently(lambda: client.delete_run(run_id), "removing a duplicate sweep run", patience)
            run_id = recorded
    else:
        patiently(lambda: client.update_run(run_id, status="RUNNING"), "resuming the sweep's run", patience)
    return client, run_id


def new_driver(sweep: Sweep, base: Params) -> Driver:
    url = study_storage(sweep.storage, repo_root())
    study, storage, created = open_study(sweep, url, base.tracking.store_patience_s)
    client, parent = start_parent_run(sweep, base, study)
    if created:
        study.set_user_attr(OBJECTIVE_ATTR, sweep.objective.model_dump())
        study.set_user_attr(PRUNER_ATTR, sweep.pruner.model_dump())
        for preset in sweep.enqueue:  # what is known already is tried first
            values = load_preset(preset)
            study.enqueue_trial(
                {k: sweep.encoded(k, values[k]) for k in sweep.space if k in values},
                user_attrs={"preset": preset},
                skip_if_exists=True,
            )
        study.set_user_attr(DIGEST_ATTR, sweep.digest())  # last: a study without it is set up again
    print(f"sweep: study {sweep.study!r} in {shown(url)}; MLflow parent run {parent}")
    return Driver(sweep, base, study, storage, client, parent)


def state_of(trial, retried: set[int]) -> str:
    """A trial's state, with the FAILs that do not count named apart: RETRIED (its values were tried again) and
    SURPLUS."""
    if trial.state.name != "FAIL":
        return trial.state.name
    if trial.number in retried:
        return "RETRIED"
    return "SURPLUS" if trial.user_attrs.get(SURPLUS_ATTR) else "FAIL"


def states(study) -> dict[int, str]:
    """Each trial's `state_of`, by number."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}
    return {t.number: state_of(t, retried) for t in trials}


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in states(study).values():
        out[state] = out.get(state, 0) + 1
    return out


def spent(study) -> int:
    """The trials that count against the budget: finished (complete, pruned, failed) or running."""
    return sum(state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING") for state in states(study).values())


@contextmanager
def sweep_run_ended(d: Driver) -> Iterator[None]:
    """The sweep's parent run ends with the block: FINISHED, KILLED on Ctrl-C, FAILED on an error.

    Never left RUNNING by a sweep that stopped; a sweep started again sets it RUNNING again.
    """
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status == "FAILED":  # the error may be the store's own: tried once, and the next sweep ends it
            with suppress(MlflowException):
                d.client.set_terminated(d.parent_run_id, status)
        else:
            d.store("ending the sweep's run", lambda: d.client.set_terminated(d.parent_run_id, status))
