"""A sweep's study and its MLflow parent run: created once, continued by every driver that opens it.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or any
database URL, which lets drivers on several machines share one study). The trials' MLflow
runs are grouped under the sweep's parent run, which holds the sweep file and the report.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mlflow.exceptions import MlflowException

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import Params
from cifar_rounds.core.urls import missing_driver
from cifar_rounds.search.spec import Sweep
from cifar_rounds.search.storage import patient_storage, shown
from cifar_rounds.search.trial import OBJECTIVE_ATTR, PARENT_RUN_ATTR, PRUNER_ATTR, SWEEP_TAG, study_storage
from cifar_rounds.tracking.patience import patiently
from cifar_rounds.tracking.store import open_client, repo_root

DIGEST_ATTR = "space_digest"
QUEUE_ATTR = "queue"  # the host and repository whose DVC queue runs a trial
# beside DVC's queue state (.dvc/tmp/exps): the queue's id moves with the repository, and a clone has its own
QUEUE_ID_FILE = Path(".dvc/tmp/sweep-queue-id")
RETRIED_ATTR = "retried"  # a FAIL trial whose values were queued again: not counted against the budget

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
    queue: str  # the host and repository whose DVC queue this driver fills
    missing: dict[int, float] = field(default_factory=dict)  # trial -> when its queue entry was first found missing
    inherited: set[int] = field(default_factory=set)  # trials left RUNNING by an earlier driver

    def store(self, what: str, call: Callable[[], T]) -> T:
        """A read or write of the tracking store, retried while it is busy, as every other writer's."""
        return patiently(call, what, self.base.tracking.store_patience_s)

    def missing_for(self, number: int) -> float:
        """Seconds since the trial's queue entry was first found missing (0 now)."""
        return time.monotonic() - self.missing.setdefault(number, time.monotonic())

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.sweep.study)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def still_running(self, number: int) -> bool:
        """Read again: the train stage may have told the study since the list was read."""
        return self.storage.get_trial(self.trial_id(number)).state.name == "RUNNING"

    def mark_retried(self, number: int) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), RETRIED_ATTR, True)

    def ours(self, trial) -> bool:
        """Whether this driver's queue runs the trial (other machines may share the study); trials queued before
        queues had an id name the host and the repository's path."""
        return trial.user_attrs.get(QUEUE_ATTR, self.queue) in (self.queue, f"{socket.gethostname()}:{repo_root()}")

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
                "sweep.study": self.sweep.study,
                "sweep.trial": trial.number,
                "sweep.storage": self.sweep.storage,
            }
        )
        return values


def open_storage(url: str, patience_s: float, attempts: int = 5):
    """Optuna's storage at `url`, each call retried while the database is unreachable. Drivers starting
    together on a new database race to create its tables: the one that loses retries, and finds them made."""
    for attempt in range(attempts):
        try:
            return patient_storage(url, patience_s, wait_to_open=False)
        except Exception as error:
            line = missing_driver(error, "sweep storage", url)  # a driver not installed: the package named
            if line is not None:
                raise StageError(line) from None
            first = str(error).splitlines()[0][:160]
            if attempt + 1 < attempts and ("duplicate key" in first or "already exists" in first):
                time.sleep(1.0 + attempt)
                continue
            raise StageError(f"sweep storage: cannot open {shown(url)} ({first})") from None


def open_study(sweep: Sweep, url: str, patience_s: float, driver: str = ""):
    """Create or continue the study; a study of the same name with another space is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, patience_s)
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.study,
        direction=sweep.objective.direction,
        pruner=sweep.pruner.build(),
        load_if_exists=True,
    )
    # seeded by the trials so far and by the driver: a driver started again must not replay an earlier
    # driver's proposals, nor two drivers started together (on two machines) propose the same values
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


def queue_id(root: Path) -> str:
    """The id of this repository's DVC queue, made once: a repository moved with `mv` keeps it (and its queue's
    trials), a clone gets its own."""
    path = root / QUEUE_ID_FILE
    if not (root / QUEUE_ID_FILE.parts[0]).is_dir():  # no DVC project, so no queue: never make one appear
        return str(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    mine.write_text(uuid.uuid4().hex)
    try:  # a link appears whole or not at all: of drivers started together, the first one's id is everyone's
        os.link(mine, path)
    except FileExistsError:
        pass
    finally:
        mine.unlink()
    return path.read_text().strip()


def new_driver(sweep: Sweep, base: Params) -> Driver:
    root = repo_root()
    url, queue = study_storage(sweep.storage, root), f"{socket.gethostname()}:{queue_id(root)}"
    study, storage, created = open_study(sweep, url, base.tracking.store_patience_s, queue)
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
    return Driver(sweep, base, study, storage, client, parent, queue)


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = "RETRIED" if t.state.name == "FAIL" and t.user_attrs.get(RETRIED_ATTR) else t.state.name
        out[key] = out.get(key, 0) + 1
    return out


@contextmanager
def sweep_run_ended(d: Driver) -> Iterator[None]:
    """The sweep's parent run ends with the block: FINISHED, KILLED on Ctrl-C, FAILED on an error.

    Never left RUNNING by a driver that stopped; a driver started again sets it RUNNING again.
    """
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status == "FAILED":  # the error may be the store's own: tried once, and the next driver ends it
            with suppress(MlflowException):
                d.client.set_terminated(d.parent_run_id, status)
        else:
            d.store("ending the sweep's run", lambda: d.client.set_terminated(d.parent_run_id, status))
