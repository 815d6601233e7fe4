"""`python -m cifar_rounds.search.sweep sweeps/round-3.yaml --workers 2`: search round N+1 through DVC's queue.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or
any database URL, which lets drivers on several machines share one study). The
driver asks the study for a trial, queues it as the named DVC experiment
STUDY-t007 with every value set (`-S`), and keeps `--workers` trials training
through DVC's queue, as many ready to take a training's place the moment it
ends, and one more queued (search/queue.py). The train stage reports each epoch to its trial and
stops when the pruner says so; it tells the study the result. Each trial is one MLflow run
under the sweep's parent run. Killed and run again, the driver continues the
same study: trials left RUNNING whose experiment is gone are marked FAIL and
retried with the same values, and their MLflow runs are ended KILLED.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.params import ParamsError, load_params, with_overrides
from cifar_rounds.search.promote import preset_target, promote
from cifar_rounds.search.queue import (
    ORPHANED,
    queue_experiment,
    queue_states,
    saved_experiments,
    start_workers,
    stop_idle_workers,
)
from cifar_rounds.search.report import write_sweep_report
from cifar_rounds.search.spec import load_sweep
from cifar_rounds.search.study import QUEUE_ATTR, Driver, counts, new_driver, sweep_run_ended
from cifar_rounds.search.trial import (
    STATE_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    conclude,
)
from cifar_rounds.tracking.run import END_REASON_TAG
from cifar_rounds.tracking.store import repo_root

POLL_S = 5.0
# `dvc queue start` is a DVC process (a second of CPU the trainings lose): run when a trial was queued, else
# this often, for workers that left (DVC's workers exit after an empty queue) or died with trials still queued
WORKERS_CHECK_S = 60.0
# DVC moves a finished experiment between its queue's lists: for a moment the queue knows it under no
# state, before or after its experiment is saved. Only an entry missing this long (and unsaved) is lost.
LOST_AFTER_S = 30.0
ORPHANED_ATTR, MAX_ORPHANED = "orphaned", 3  # how often a trial's values were orphaned; retried up to this


def settle(d: Driver) -> list[int]:
    """Trials still RUNNING: those whose experiment is queued or running; the others are concluded or ended FAIL.

    A trial is concluded from its result when the queue says Success or its experiment is saved (the
    queue may have dropped the entry, e.g. `dvc queue remove --success`). It is lost when it failed, or
    when the queue has not known it, or has shown it Running with no worker active and no process of its
    own, for LOST_AFTER_S and nothing is saved. A lost trial that an earlier driver left RUNNING
    (`d.inherited`: a killed driver or worker), or that the queue orphaned, is also queued again with the
    same values, once: the FAIL is then not counted against the budget.
    """
    import optuna

    running = [
        t for t in d.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING and d.ours(t)
    ]
    states = queue_states({d.trial_name(t.number) for t in running})
    ended = [t for t in running if states.get(d.trial_name(t.number)) not in ("Queued", "Running")]
    saved = saved_experiments(repo_root()) if ended else set()
    alive = [t.number for t in running if t not in ended]
    for number in alive:
        d.missing.pop(number, None)  # seen in the queue again: a later absence starts its own count
    for t in ended:
        name, state = d.trial_name(t.number), states.get(d.trial_name(t.number))
        if not d.still_running(t.number):
            continue
        if state == "Success" or name in saved:
            print(f"sweep: trial {t.number} ({name}) {conclude(d.study, t.number).lower()}")
            continue
        if state in (None, ORPHANED) and d.missing_for(t.number) < LOST_AFTER_S:
            alive.append(t.number)  # perhaps between the queue's lists, or a worker starting: looked at again
            continue
        # lost by a killed driver or worker: tried again once with the same values; orphaned by the queue
        # itself (no fault of the trial's): tried again up to MAX_ORPHANED times
        orphaned = t.user_attrs.get(ORPHANED_ATTR, 0) + (state == ORPHANED)
        retry = (state == ORPHANED and orphaned <= MAX_ORPHANED) or (
            t.number in d.inherited and "retry_of" not in t.user_attrs
        )
        if retry:
            attrs = {k: v for k, v in t.user_attrs.items() if k != QUEUE_ATTR}
            d.study.enqueue_trial(t.params, user_attrs={**attrs, "retry_of": t.number, ORPHANED_ATTR: orphaned})
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
    experiment = d.store("reading the sweep's run", lambda: d.client.get_run(d.parent_run_id).info.experiment_id)
    found = f"tags.`{SWEEP_TAG}` = '{d.sweep.study}' and tags.`{TRIAL_TAG}` = '{number}'"
    for r in d.store("finding the trial's runs", lambda: d.client.search_runs([experiment], found)):
        d.store("tagging the trial's run", lambda: d.client.set_tag(r.info.run_id, STATE_TAG, "FAIL"))
        if r.info.status == "RUNNING":
            why = "the sweep lost this trial's experiment; trial marked FAIL"
            d.store("ending the trial's run", lambda: d.client.set_tag(r.info.run_id, END_REASON_TAG, why))
            d.store("ending the trial's run", lambda: d.client.set_terminated(r.info.run_id, "KILLED"))


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
    try:
        queue_experiment(d.trial_name(trial.number), values)
    except StageError:
        d.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    print(f"sweep: queued trial {trial.number} as {d.trial_name(trial.number)}")
    return True


def drive(d: Driver, workers: int, poll_s: float = POLL_S) -> None:
    """Keep `workers` trials training, as many ready to train and one queued, until the budget is spent and
    every trial has ended."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    d.inherited = {t.number for t in d.study.get_trials(deepcopy=False) if t.state == running and d.ours(t)}
    alive = settle(d)
    started = -math.inf  # when `dvc queue start` last ran
    while True:
        # a trial for each of the 2 x workers queue workers (half train, half wait ready) and one queued: a
        # worker that finds the queue empty shuts down, one handed a task as it shuts down orphaning it (a DVC
        # race), and one whose trial waits on the driver leaves its place idle (27 s of 345 measured)
        queued = False
        while len(alive) < 2 * workers + 1 and queue_next(d):
            queued, alive = True, settle(d)
        if not alive:
            break
        if queued or time.monotonic() - started >= WORKERS_CHECK_S:
            start_workers(workers)
            started = time.monotonic()
        time.sleep(poll_s)
        alive = settle(d)
    stop_idle_workers()
    c = counts(d.study)
    print("sweep: done; " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items())))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/round-3.yaml")
    parser.add_argument("--workers", type=int, default=1, help="trials run at once by DVC's queue (dvc queue start -j)")
    parser.add_argument(
        "--promote", metavar="NAME", help="write the best trial's searched values onto the baseline as rounds/NAME.yaml"
    )
    parser.add_argument("--force", action="store_true", help="--promote over an existing preset (kept as a backup)")
    parser.add_argument("--no-run", action="store_true", help="only report (and promote) from the study as it is")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers: at least 1")
    base = load_params()
    sweep = load_sweep(args.sweep, base, load_preset)
    if args.promote:
        preset_target(args.promote, args.force)  # refused now, not after a night of trials
    d = new_driver(sweep, base)
    with sweep_run_ended(d):
        if not args.no_run:
            drive(d, args.workers)
        write_sweep_report(d, None if args.no_run else args.workers)
    if args.promote:
        promote(d, args.promote, args.force)


if __name__ == "__main__":
    run_stage(main)
