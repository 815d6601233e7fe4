"""DVC's experiment queue, as the sweep driver uses it: queue a trial, start the workers, read the tasks' states.

`dvc queue status` is asked again when it fails; a task shown Running with no worker active and no
process of its own is ORPHANED (DVC's queue can hand a task to a worker that is shutting down). Saved
experiments are read from their git refs, which outlive the queue's entries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cifar_rounds.analysis.rounds import exp_run_command
from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.store import repo_root
from cifar_rounds.training.lease import TRAININGS_ENV

QUEUE_TRIES, QUEUE_PAUSE_S = 6, 5.0  # queueing waits this long in all for a git index another process holds
STALE_LOCK_S = 30.0  # git holds .git/index.lock for moments: one this old was left by a killed process
WORKERS_LOG = Path(".dvc/tmp/sweep-workers.log")  # what `dvc queue start` and its workers print, from the repo root
QUEUE_STATUS_TRIES, QUEUE_STATUS_PAUSE_S = 3, 5.0  # `dvc queue status` asked again after a failure


ORPHANED = "Orphaned"  # Running in DVC's queue, with no worker active to run it, and no process of its own


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
    `dvc queue status` then shows 0 active workers, and only the process tells the task is alive. DVC's queue
    records each task's process (pid, and its return code once it ends) by the task's revision."""
    from dvc.repo import Repo

    with Repo(str(repo_root())) as repo:
        processes = list(repo.experiments.celery_queue.proc.processes())
    return any(rev.startswith(task) and info.returncode is None and process_alive(info.pid) for rev, info in processes)


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
    """`dvc queue start -j 2*workers`, detached: its forked workers must not hold pipes the driver waits on.

    The project's trainings are capped at `workers` (TRAININGS_ENV): the other workers get their
    experiments through DVC's set-up and the stages before training while the trainings run, then wait
    for a training place, and start the moment one frees, while the worker that held it evaluates. As
    many wait as train: trainings of equal length end together (one spare covered one of two places:
    the other stayed idle 89 s, benchmarks/RESULTS.md).
    Idempotent: workers that exist are kept; DVC's workers exit when the queue has been empty a while.
    Their output goes to WORKERS_LOG, appended.
    """
    log = repo_root() / WORKERS_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "start", "-j", str(2 * workers)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, TRAININGS_ENV: str(workers)},
        )


def stop_idle_workers() -> bool:
    """`dvc queue stop` once DVC's queue has nothing queued or running; whether it was asked.

    A worker leaves by itself when its monitor finds the queue empty, but the monitor can die (it read a
    broker message another process was still writing: a JSONDecodeError in the worker's log), and the
    worker then idles until it is stopped. Workers that other queued experiments still need are left.
    """
    result = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True)
    states = parse_queue_status(result.stdout) if result.returncode == 0 else None
    if states is None or any(state in ("Queued", "Running") for state in states.values()):
        return False
    log = repo_root() / WORKERS_LOG
    with open(log, "ab") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "stop"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            timeout=120,
        )
    return True
