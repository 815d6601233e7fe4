"""`cifar-rounds sweep sweeps/round-3.yaml --workers 2`: search round N+1 on Optuna's own loop.

The study lives in Optuna's storage (sqlite optuna.db at the repository root, or any
database URL, which lets sweeps on several machines share one study). The sweep trains
`--workers` trials at once: it starts that many worker processes (search/worker.py), and
`--ready` more if asked, each running the study's trials in its own clone of the repository
at this commit, its trainings capped at `--workers` (a ready worker's trial gets through
DVC's set-up while the others train, and takes the first place that frees). Each trial is
the DVC experiment STUDY-t007, pushed to this repository, and one MLflow run under the
sweep's parent run. Killed and run again, the sweep continues the same study: Optuna
fails the trials whose workers died and tries their values again.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from cifar_rounds.analysis.clones import git, head_commit, uncommitted
from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.interrupts import interrupts_caught
from cifar_rounds.core.params import load_params
from cifar_rounds.search.promote import preset_target, promote
from cifar_rounds.search.report import write_sweep_report
from cifar_rounds.search.spec import load_sweep
from cifar_rounds.search.study import Driver, counts, new_driver, sweep_run_ended
from cifar_rounds.tracking.store import repo_root

POLL_S = 0.5  # how often the sweep looks at its workers and at the signals it received


def worker_command(sweep: Path, commit: str, trainings: int, team_remote: str | None) -> list[str]:
    team = ["--team-remote", team_remote] if team_remote else []
    command = [sys.executable, "-m", "cifar_rounds.search.worker", str(sweep), "--commit", commit]
    return [*command, "--trainings", str(trainings), *team]


def run_workers(d: Driver, sweep: Path, workers: int, ready: int, team: str | None) -> None:
    """`workers` + `ready` workers, `workers` training at once, until each has stopped: the budget spent, or a
    signal, passed on to each of them."""
    root = repo_root()
    commit = head_commit(root)
    changed = uncommitted(root)
    if changed:
        print(f"sweep: trials run commit {commit[:8]}; not its uncommitted changes to {', '.join(changed[:5])}")
    url = git(["remote", "get-url", team], root) if team else None
    command = worker_command(sweep, commit, workers, url)
    with interrupts_caught() as interrupts:
        # each in its own process group: a terminal's Ctrl-C reaches them once, through here
        procs = [subprocess.Popen(command, process_group=0) for _ in range(workers + ready)]
        while any(p.poll() is None for p in procs):
            interrupts.pass_on_to_all(procs, signal.SIGTERM)
            time.sleep(POLL_S)
    codes = [p.returncode for p in procs]
    interrupts.stop_if_any("the sweep (its workers stopped; the same command continues the study)")
    if any(codes):
        raise StageError(f"sweep: a worker failed (exit codes {codes}); the same command continues the study")
    print("sweep: done; " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts(d.study).items())))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/round-3.yaml")
    parser.add_argument("--workers", type=int, default=1, help="trials trained at once, each worker in its own clone")
    parser.add_argument(
        "--ready",
        type=int,
        metavar="N",
        default=0,
        help="workers more, whose trials get through DVC's set-up while the others train (default 0: on trials "
        "of minutes they did not shorten the sweep; benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--push",
        metavar="GIT_REMOTE",
        help="push each trial's experiment to this git remote too (and its files to "
        "the default DVC remote): the team's, when several machines share the study",
    )
    parser.add_argument(
        "--promote", metavar="NAME", help="write the best trial's searched values onto the baseline as rounds/NAME.yaml"
    )
    parser.add_argument("--force", action="store_true", help="--promote over an existing preset (kept as a backup)")
    parser.add_argument("--no-run", action="store_true", help="only report (and promote) from the study as it is")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers: at least 1")
    if args.ready < 0:
        parser.error("--ready: 0 or more")
    base = load_params()
    sweep = load_sweep(args.sweep, base, load_preset)
    if args.promote:
        preset_target(args.promote, args.force)  # refused now, not after a night of trials
    d = new_driver(sweep, base)
    with sweep_run_ended(d):
        if not args.no_run:
            run_workers(d, args.sweep, args.workers, args.ready, args.push)
        write_sweep_report(d, None if args.no_run else args.workers)
    if args.promote:
        promote(d, args.promote, args.force)


if __name__ == "__main__":
    run_stage(main)
