"""`python -m cifar_rounds.search.sweep sweeps/round-3.yaml --workers 2`: search round N+1 through DVC's queue.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or
any database URL, which lets drivers on several machines share one study). The
driver asks the study for a trial, queues it as the named DVC experiment
STUDY-t007 with every value set (`-S`), and keeps `--workers` trials running in
DVC's queue and one more waiting. The train stage reports each epoch to its trial and stops when
the pruner says so; it tells the study the result. Each trial is one MLflow run
under the sweep's parent run. Killed and run again, the driver continues the
same study: trials left RUNNING whose experiment is gone are marked FAIL and
retried with the same values, and their MLflow runs are ended KILLED.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cifar_rounds.analysis.rounds import exp_run_command, load_preset
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.params import ParamsError, load_params, with_overrides
from cifar_rounds.search.promote import preset_target, promote
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
QUEUE_TRIES, QUEUE_PAUSE_S = 6, 5.0  # queueing waits this long in all for a git index another process holds
STALE_LOCK_S = 30.0  # git holds .git/index.lock for moments: one this old was left by a killed process
# DVC moves a finished experiment between its queue's lists: for a moment the queue knows it under no
# state, before or after its experiment is saved. Only an entry missing this long (and unsaved) is lost.
LOST_AFTER_S = 30.0
WORKERS_LOG = Path(".dvc/tmp/sweep-workers.log")  # what `dvc queue start` and its workers print, from the repo root
QUEUE_STATUS_TRIES, QUEUE_STATUS_PAUSE_S = 3, 5.0  # `dvc queue status` asked again after a failure


ORPHANED = "Orphaned"  # Running in DVC's queue, with no worker active to run it, and no process of its own
# DVC's record of each task's process, by the task's revision: run/<rev>/<rev>.json, returncode null until it ends
TASK_PROCESSES = Path(".dvc/tmp/exps/run")
ORPHANED_ATTR, MAX_ORPHANED = "orphaned", 3  # how often a trial's values were orphaned; retried up to this


def parse_queue_status(out: str) -> dict[str, str] | None:
    """Name -> status of each task in `dvc queue status`'s output; None if the output is not its table."""
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines or not lines[-1].startswith("Worker status:"):
        return None
    tasks = lines[:-1]
    if tasks == ["No experiment tasks in the queue."]:
        return {}
    if not tasks or tasks[0].split() != ["Task", "Name", "Created", "Status"]:
        return None
    rows = [line.split() for line in tasks[1:]]
    return {words[1]: words[-1] for words in rows if len(words) >= 4}


def task_ids(out: str) -> dict[str, str]:
    """Name -> task (the revision's first characters) of each named task in `dvc queue status`'s table."""
    rows = [line.split() for line in out.splitlines()[1:]]
    return {words[1]: words[0] for words in rows if len(words) >= 4}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def task_process_running(task: str) -> bool:
    """Whether the queue task has a process that has not ended. A worker that starts shutting down (its monitor
    found no task, e.g. asked while busy on a loaded machine) still runs its task, but answers no inspection:
    `dvc queue status` then shows 0 active workers, and only the process tells the task is alive."""
    for record in (repo_root() / TASK_PROCESSES).glob(f"{task}*/*.json"):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):  # being written: looked at again at the next poll
            return True
        if info.get("returncode") is None and process_alive(int(info["pid"])):
            return True
    return False


def queue_states(names: set[str]) -> dict[str, str]:
    """DVC queue status (Queued, Running, Success, Failed) of the named experiments that the queue knows.

    A failed or unreadable `dvc queue status` is asked again; one that keeps failing stops the driver:
    read as an empty queue, it would have every running trial taken for lost.
    """
    for attempt in range(1, QUEUE_STATUS_TRIES + 1):
        result = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True)
        states = parse_queue_status(result.stdout) if result.returncode == 0 else None
        if states is not None:
            # a task left Running by a worker that exited (DVC's queue can hand a task to a worker that is
            # shutting down): with no worker active and no process of its own, nothing will ever end it
            idle, tasks = "Worker status: 0 active" in result.stdout, task_ids(result.stdout)
            return {
                name: ORPHANED if idle and state == "Running" and not task_process_running(tasks[name]) else state
                for name, state in states.items()
                if name in names
            }
        if attempt < QUEUE_STATUS_TRIES:
            time.sleep(QUEUE_STATUS_PAUSE_S)
    said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1][:200]
    why = f"exit {result.returncode}" if result.returncode else "output not understood"
    raise StageError(
        f"sweep: `dvc queue status` failed {QUEUE_STATUS_TRIES} times ({why}: {said}); "
        "the trials are left as they are: rerun the sweep to continue"
    )


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


def queue_experiment(name: str, values: dict[str, object]) -> None:
    """`dvc exp run --queue`, waiting out a git index that another process holds (a worker saving its
    experiment); an index lock old enough to be a killed process's (a driver killed while queueing) goes."""
    for attempt in range(1, QUEUE_TRIES + 1):
        result = subprocess.run(exp_run_command(name, values, ["--queue"]), capture_output=True, text=True)
        locked = "index is locked" in result.stderr
        if result.returncode == 0 or not locked or attempt == QUEUE_TRIES:
            break
        lock = repo_root() / ".git" / "index.lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            print(f"sweep: removed {lock}, left {STALE_LOCK_S:.0f} s and more ago by a process that was killed")
        time.sleep(QUEUE_PAUSE_S)
    if result.returncode != 0:
        said = [line for line in result.stderr.splitlines() if line.strip() and "dvc.org/support" not in line]
        raise StageError(f"dvc exp run --queue failed for {name}: {(said or ['no output'])[-1][:200]}")


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
        )


def drive(d: Driver, workers: int, poll_s: float = POLL_S) -> None:
    """Keep `workers` trials in the queue until the budget is spent and every trial has ended."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    d.inherited = {t.number for t in d.study.get_trials(deepcopy=False) if t.state == running and d.ours(t)}
    alive = settle(d)
    while True:
        # one trial more than the workers waits in the queue: a worker that finds the queue empty shuts down,
        # and one handed a task as it shuts down orphans it (a DVC race); the busy share gains too
        while len(alive) < workers + 1 and queue_next(d):
            alive = settle(d)
        if not alive:
            break
        start_workers(workers)
        time.sleep(poll_s)
        alive = settle(d)
    c = counts(d.study)
    print("sweep: done; " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/round-3.yaml")
    parser.add_argument("--workers", type=int, default=1, help="trials run at once by DVC's queue (dvc queue start -j)")
    parser.add_argument(
        "--promote", metavar="NAME", help="write the best trial's searched values onto the baseline as rounds/NAME.yaml"
    )
    parser.add_argument("--force", action="store_true", help="--promote over an existing preset (kept as a backup)")
    parser.add_argument("--no-run", action="store_true", help="only report (and promote) from the study as it is")
    args = parser.parse_args()
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
        write_sweep_report(d)
    if args.promote:
        promote(d, args.promote, args.force)


if __name__ == "__main__":
    run_stage(main)
