"""`python -m cifar_rounds.search.sweep sweeps/round-3.yaml --workers 2`: search round N+1 through DVC's queue.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or
any database URL, which lets drivers on several machines share one study). The
driver asks the study for a trial, queues it as the named DVC experiment
STUDY-t007 with every value set (`-S`), and keeps `--workers` trials in DVC's
queue at a time. The train stage reports each epoch to its trial and stops when
the pruner says so; it tells the study the result. Each trial is one MLflow run
under the sweep's parent run. Killed and run again, the driver continues the
same study: trials left RUNNING whose experiment is gone are marked FAIL and
retried with the same values, and their MLflow runs are ended KILLED.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cifar_rounds.analysis.rounds import PRESETS_DIR, exp_run_command, load_preset
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.params import Params, ParamsError, load_params, unflatten, with_overrides, write_yaml
from cifar_rounds.search.spec import Sweep, check_enqueued, load_sweep
from cifar_rounds.search.trial import (
    OBJECTIVE_ATTR,
    PARENT_RUN_ATTR,
    PRUNER_ATTR,
    STATE_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    conclude,
    study_storage,
)
from cifar_rounds.tracking.run import END_REASON_TAG, open_client, repo_root

DIGEST_ATTR = "space_digest"
QUEUE_ATTR = "queue"  # the host and repository whose DVC queue runs a trial
RETRIED_ATTR = "retried"  # a FAIL trial whose values were queued again: not counted against the budget
POLL_S = 5.0
# DVC moves a finished experiment between its queue's lists: for a moment the queue knows it under no
# state, before or after its experiment is saved. Only an entry missing this long (and unsaved) is lost.
LOST_AFTER_S = 30.0
WORKERS_LOG = Path(".dvc/tmp/sweep-workers.log")  # what `dvc queue start` and its workers print, from the repo root


@dataclass
class Driver:
    """One sweep's study, base params and MLflow parent run."""

    sweep: Sweep
    base: Params
    study: object  # optuna.Study
    storage: object  # its optuna storage
    client: object  # MlflowClient
    parent_run_id: str
    queue: str = field(default_factory=lambda: f"{socket.gethostname()}:{repo_root()}")
    missing: dict[int, float] = field(default_factory=dict)  # trial -> when its queue entry was first found missing
    inherited: set[int] = field(default_factory=set)  # trials left RUNNING by an earlier driver

    def lost(self, number: int) -> bool:
        """Whether the trial's queue entry has now been missing for LOST_AFTER_S."""
        return time.monotonic() - self.missing.setdefault(number, time.monotonic()) >= LOST_AFTER_S

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.sweep.study)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def still_running(self, number: int) -> bool:
        """Read again: the train stage may have told the study since the list was read."""
        return self.storage.get_trial(self.trial_id(number)).state.name == "RUNNING"

    def mark_retried(self, number: int) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), RETRIED_ATTR, True)

    def ours(self, trial) -> bool:
        """Whether this driver's queue runs the trial (other machines may share the study)."""
        return trial.user_attrs.get(QUEUE_ATTR, self.queue) == self.queue

    def trial_name(self, number: int) -> str:
        return f"{self.sweep.study}-t{number:03d}"

    def trial_values(self, trial) -> dict[str, object]:
        """Everything the experiment runs with: the baseline preset, the fixed values, the trial's and its identity."""
        values = {**load_preset(self.sweep.baseline), **self.sweep.fixed}
        values.update({name: dim.suggest(trial, name) for name, dim in self.sweep.space.items()})
        values.update(
            {
                "tracking.round": self.trial_name(trial.number),
                "sweep.study": self.sweep.study,
                "sweep.trial": trial.number,
                "sweep.storage": self.sweep.storage,
            }
        )
        return values


def open_study(sweep: Sweep, url: str):
    """Create or continue the study; a study of the same name with another space is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.get_storage(url)
    except Exception as error:
        raise StageError(f"sweep storage: cannot open {url} ({str(error).splitlines()[0][:160]})") from None
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.study,
        direction=sweep.objective.direction,
        pruner=sweep.pruner.build(),
        load_if_exists=True,
    )
    # seeded by the trials so far: a driver started again must not replay the first driver's proposals
    study.sampler = sweep.sampler.build(sweep.space, len(study.trials))
    known = study.user_attrs.get(DIGEST_ATTR)
    if known is not None and known != sweep.digest():
        raise StageError(
            f"study {sweep.study!r} in {url} was created from another search space "
            f"(space digest {known}, this file's {sweep.digest()}); choose another `study:` name"
        )
    return study, storage, known is None


def start_parent_run(sweep: Sweep, base: Params, study) -> tuple[object, str]:
    """The sweep's MLflow run, which the trials' runs are grouped under; created once per study."""
    client, exp_id = open_client(base)
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=sweep.study, tags={SWEEP_TAG: sweep.study}).info.run_id
        client.log_dict(run_id, sweep.model_dump(), "sweep.json")
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
    else:
        client.update_run(run_id, status="RUNNING")
    return client, run_id


def new_driver(sweep: Sweep, base: Params) -> Driver:
    url = study_storage(sweep.storage, repo_root())
    study, storage, created = open_study(sweep, url)
    client, parent = start_parent_run(sweep, base, study)
    if created:
        study.set_user_attr(OBJECTIVE_ATTR, sweep.objective.model_dump())
        study.set_user_attr(PRUNER_ATTR, sweep.pruner.model_dump())
        for preset in sweep.enqueue:  # what is known already is tried first
            values = load_preset(preset)
            study.enqueue_trial(
                {k: encoded(sweep, k, values[k]) for k in sweep.space if k in values},
                user_attrs={"preset": preset},
                skip_if_exists=True,
            )
        study.set_user_attr(DIGEST_ATTR, sweep.digest())  # last: a study without it is set up again
    print(f"sweep: study {sweep.study!r} in {url}; MLflow parent run {parent}")
    return Driver(sweep, base, study, storage, client, parent)


def encoded(sweep: Sweep, key: str, value: object) -> object:
    """A value as the study stores it (categorical values as JSON text)."""
    return json.dumps(value) if sweep.space[key].type == "categorical" else value


def queue_states(names: set[str]) -> dict[str, str]:
    """DVC queue status (Queued, Running, Success, Failed) of the named experiments that the queue knows."""
    out = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True).stdout
    states = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] in names:
            states[words[1]] = words[-1]
    return states


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = "RETRIED" if t.state.name == "FAIL" and t.user_attrs.get(RETRIED_ATTR) else t.state.name
        out[key] = out.get(key, 0) + 1
    return out


def saved_experiments(root: Path) -> set[str]:
    """Names of the DVC experiments saved in the repository, on any baseline: DVC saves only those that succeeded.

    Their refs are refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; DVC's own refs (the queue's stash,
    the executors') have other shapes.
    """
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root, capture_output=True, text=True
    ).stdout
    parts = [ref.split("/") for ref in out.split()]
    return {p[4] for p in parts if len(p) == 5 and len(p[2]) == 2}


def settle(d: Driver) -> list[int]:
    """Trials still RUNNING: those whose experiment is queued or running; the others are concluded or ended FAIL.

    A trial is concluded from its result when the queue says Success or its experiment is saved (the
    queue may have dropped the entry, e.g. `dvc queue remove --success`). It is lost when it failed, or
    when the queue has not known it for LOST_AFTER_S and nothing is saved. A lost trial that an earlier
    driver left RUNNING (`d.inherited`: a killed driver or worker) is also queued again with the same
    values, once: the FAIL is then not counted against the budget.
    """
    import optuna

    running = [
        t for t in d.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING and d.ours(t)
    ]
    states = queue_states({d.trial_name(t.number) for t in running})
    ended = [t for t in running if states.get(d.trial_name(t.number)) not in ("Queued", "Running")]
    saved = saved_experiments(repo_root()) if ended else set()
    alive = [t.number for t in running if t not in ended]
    for t in ended:
        name, state = d.trial_name(t.number), states.get(d.trial_name(t.number))
        if not d.still_running(t.number):
            continue
        if state == "Success" or name in saved:
            print(f"sweep: trial {t.number} ({name}) {conclude(d.study, t.number).lower()}")
            continue
        if state is None and not d.lost(t.number):
            alive.append(t.number)  # perhaps between the queue's lists: looked at again next time
            continue
        retry = t.number in d.inherited and "retry_of" not in t.user_attrs
        if retry:
            attrs = {k: v for k, v in t.user_attrs.items() if k != QUEUE_ATTR}
            d.study.enqueue_trial(t.params, user_attrs={**attrs, "retry_of": t.number})
            d.mark_retried(t.number)
        print(
            f"sweep: trial {t.number} ({name}) {'was lost' if state is None else state.lower()}"
            f"; marked FAIL{', retrying it' if retry else ''}"
        )
        d.study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        end_trial_runs(d, t.number)
    return alive


def end_trial_runs(d: Driver, number: int) -> None:
    """Mark a failed trial's MLflow runs FAIL; end those still RUNNING as KILLED, saying why."""
    runs = d.client.search_runs(
        [d.client.get_run(d.parent_run_id).info.experiment_id],
        f"tags.`{SWEEP_TAG}` = '{d.sweep.study}' and tags.`{TRIAL_TAG}` = '{number}'",
    )
    for r in runs:
        d.client.set_tag(r.info.run_id, STATE_TAG, "FAIL")
        if r.info.status == "RUNNING":
            d.client.set_tag(r.info.run_id, END_REASON_TAG, "the sweep lost this trial's experiment; trial marked FAIL")
            d.client.set_terminated(r.info.run_id, "KILLED")


def queue_next(d: Driver) -> bool:
    """Ask for one more trial and queue it; False when the budget is spent."""
    c = counts(d.study)
    if sum(c.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")) >= d.sweep.trials:
        return False
    import optuna

    trial = d.study.ask()
    trial.set_user_attr(QUEUE_ATTR, d.queue)
    values = d.trial_values(trial)
    try:
        with_overrides(d.base, values)
    except ParamsError as error:  # e.g. milestones past a searched num_epochs
        print(f"sweep: trial {trial.number} has invalid values ({error}); marked FAIL")
        d.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return True
    result = subprocess.run(
        exp_run_command(d.trial_name(trial.number), values, ["--queue"]), capture_output=True, text=True
    )
    if result.returncode != 0:
        d.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise StageError(f"dvc exp run --queue failed for {d.trial_name(trial.number)}: {result.stderr.strip()[-300:]}")
    print(f"sweep: queued trial {trial.number} as {d.trial_name(trial.number)}")
    return True


def worker_env(workers: int) -> dict[str, str]:
    """The queue workers' environment: each of `workers` concurrent trials gets its share of the CPU cores.

    By default every torch process starts a thread per core; several on one CPU oversubscribe it,
    and their spin-waiting threads slow each other many times over. An OMP_NUM_THREADS already
    set is kept. (GPU trials are not affected.)
    """
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)), **os.environ}


def start_workers(workers: int) -> None:
    """`dvc queue start -j workers`, detached: its forked workers must not hold pipes the driver waits on.

    Idempotent: workers that exist are kept; DVC's workers exit when the queue has been empty a while.
    Their output goes to WORKERS_LOG, appended.
    """
    log = repo_root() / WORKERS_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "start", "-j", str(workers)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=worker_env(workers),
        )


def drive(d: Driver, workers: int, poll_s: float = POLL_S) -> None:
    """Keep `workers` trials in the queue until the budget is spent and every trial has ended."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    d.inherited = {t.number for t in d.study.get_trials(deepcopy=False) if t.state == running and d.ours(t)}
    alive = settle(d)
    while True:
        while len(alive) < workers and queue_next(d):
            alive = settle(d)
        if not alive:
            break
        start_workers(workers)
        time.sleep(poll_s)
        alive = settle(d)
    c = counts(d.study)
    print("sweep: done; " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items())))


def promote(d: Driver, name: str, folder: Path = PRESETS_DIR) -> Path:
    """Write the best trial as the preset rounds/NAME.yaml: the baseline, the fixed values and the trial's."""
    best = d.study.best_trial  # raises ValueError without a complete trial
    values = {**load_preset(d.sweep.baseline), **d.sweep.fixed}
    values.update({k: json.loads(v) if d.sweep.space[k].type == "categorical" else v for k, v in best.params.items()})
    with_overrides(d.base, values)
    path = folder / f"{name}.yaml"
    header = (
        f"Round {name}: the best trial of sweep {d.sweep.study!r} (trial {best.number}, "
        f"{d.sweep.objective.metric} {best.value:.4f}), promoted from its baseline {d.sweep.baseline}."
    )
    write_yaml(unflatten(values), path, header)
    print(
        f"sweep: promoted trial {best.number} to {path}; next: python -m "
        f"cifar_rounds.analysis.rounds run {name} --seeds 5"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/round-3.yaml")
    parser.add_argument("--workers", type=int, default=1, help="trials run at once by DVC's queue (dvc queue start -j)")
    parser.add_argument("--promote", metavar="NAME", help="write the best trial as the preset rounds/NAME.yaml")
    parser.add_argument("--no-run", action="store_true", help="only report (and promote) from the study as it is")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers: at least 1")
    base = load_params()
    sweep = load_sweep(args.sweep, base)
    check_enqueued(sweep, {name: load_preset(name) for name in sweep.enqueue + [sweep.baseline]}, args.sweep)
    if args.promote and not (PRESETS_DIR / f"{args.promote}.yaml").parent.is_dir():
        raise StageError(f"--promote: no {PRESETS_DIR}/ folder here; run from the repository root")
    d = new_driver(sweep, base)
    if not args.no_run:
        drive(d, args.workers)
    from cifar_rounds.search.report import write_sweep_report

    write_sweep_report(d)
    if args.promote:
        promote(d, args.promote)
    d.client.set_terminated(d.parent_run_id, "FINISHED")


if __name__ == "__main__":
    run_stage(main)
