"""Clones: where experiments run side by side, each worker in its own full git clone of the repository.

DVC's experiment commands race when several run in one repository (its queue's workers, `--temp` runs and
git worktrees share refs and locks); separate clones that share one DVC cache do not. A worker takes a free
clone under CLONES_DIR (made once, reused by later sweeps and replicates) and holds it while it lives: the
lock passes to its experiment's processes, so a clone whose worker was killed stays taken until that
worker's training has ended too. Before each experiment the clone is reset to the commit the work started
from, with the repository's params.yaml and dvc.lock (what `dvc exp run` in the workspace starts from);
after it, the saved experiment is pushed to the repository, where `dvc exp show` lists it, and, given a team
remote, on to it with its files in the DVC remote. The trainings' stores and places are the repository's
(PROJECT_ENV). Remove CLONES_DIR whenever no sweep or replicate runs: it is made again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import IO

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.interrupts import Interrupts
from cifar_rounds.core.names import TRAININGS_ENV
from cifar_rounds.core.params import PARAMS_FILE
from cifar_rounds.tracking.store import PROJECT_ENV, repo_root

CLONES_DIR = Path(".dvc/tmp/clones")  # in the repository: DVC's own .gitignore keeps .dvc/tmp out of git
STARTED_FROM = (PARAMS_FILE, Path("dvc.lock"))  # the workspace's files an experiment starts from
LINKS = "hardlink,symlink"  # outputs are links into the shared cache: an experiment copies no file
MADE = Path(".dvc/config.local")  # written last when a clone is made: a clone without it was cut short
IDENTITY = ("user.name", "user.email")  # the repository's committer, for the experiments' commits
LOGS_DIR = CLONES_DIR / "logs"  # each experiment's DVC output, by its name
POLL_S = 0.5  # how often experiments running side by side are looked at


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "dvc.org/support" not in line]
    return (lines or ["no output"])[-1][:200]


def git(args: list[str], cwd: Path, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise StageError(f"git {' '.join(args)} in {cwd} failed: {last_line(result.stderr)}")
    return result.stdout.strip()


def dvc(args: list[str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"dvc {' '.join(args)} in {cwd} failed: {last_line(result.stderr)}")
    return result.stdout.strip()


def head_commit(root: Path) -> str:
    """The commit the work starts from; one line outside a git repository with a commit."""
    result = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"{root}: not a git repository with a commit; experiments run from a commit")
    return result.stdout.strip()


def uncommitted(root: Path) -> list[str]:
    """Tracked files changed since the commit, other than those an experiment starts from (which it takes)."""
    names = git(["diff", "--name-only", "HEAD"], root).splitlines()
    return [n for n in names if Path(n) not in STARTED_FROM]


@dataclass
class Clone:
    root: Path  # the repository
    path: Path
    lock: IO  # held while a worker or its experiment's processes live

    def reset(self, commit: str) -> None:
        """The commit and the repository's starting files, nothing else: earlier outputs go (their files are in the
        cache); DVC's settings and state in .dvc/ stay."""
        git(["fetch", "--quiet", "origin", "HEAD", "+refs/heads/*:refs/remotes/origin/*"], self.path)
        git(["checkout", "--quiet", "--force", "--detach", commit], self.path)
        git(["clean", "-ffdxq", "-e", "/.dvc/"], self.path)
        for name in STARTED_FROM:
            if (self.root / name).exists():
                shutil.copyfile(self.root / name, self.path / name)

    def start(self, command: list[str], log: Path, trainings: int) -> subprocess.Popen:
        """`command` in the clone, in its own process group, its output to `log`; the clone's lock goes with it."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen(
                command,
                cwd=self.path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                pass_fds=(self.lock.fileno(),),
                env={**os.environ, PROJECT_ENV: str(self.root), TRAININGS_ENV: str(trainings)},
            )

    def push(self, name: str, team_remote: str | None) -> None:
        """The saved experiment to the repository (its files are in the shared cache already), then to the team's
        git remote with its files to the DVC remote."""
        dvc(["exp", "push", "--no-cache", "origin", name], self.path)
        if team_remote is not None:
            dvc(["exp", "push", team_remote, name], self.path)


def take_clone(root: Path) -> Clone:
    """The first free clone of the repository, made if it is not there; held until this process and the
    processes it passes the lock to have ended."""
    folder = root / CLONES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for slot in count():
        lock = open(folder / f"w{slot}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        path = folder / f"w{slot}"
        made(root, path)
        return Clone(root, path, lock)
    raise AssertionError("unreachable")


def made(root: Path, path: Path) -> None:
    """A clone of `root` at `path` sharing its DVC cache by links; one cut short is made again, and one of a
    repository that moved follows it."""
    if (path / MADE).exists():
        git(["remote", "set-url", "origin", str(root)], path)
        return
    shutil.rmtree(path, ignore_errors=True)
    git(["clone", "--quiet", str(root), str(path)], root)
    for key in IDENTITY:
        value = git(["config", "--get", key], root, check=False)
        if value:
            git(["config", key, value], path)
    dvc(["config", "--local", "cache.type", LINKS], path)
    dvc(["config", "--local", "cache.dir", dvc(["cache", "dir"], root)], path)


def run_in_clones(runs: list[tuple[str, list[str]]], workers: int, interrupts: Interrupts) -> None:
    """Each named experiment command in a clone, `workers` at once, each pushed to the repository once saved; raises
    if any failed or a signal came (passed on to each running experiment as Ctrl-C)."""
    root = repo_root()
    commit, todo, running, failed = head_commit(root), list(runs), {}, []
    free = [take_clone(root) for _ in range(min(workers, len(runs)))]
    while (todo and not interrupts.signals) or running:
        while todo and free and not interrupts.signals:
            clone, (name, command) = free.pop(), todo.pop(0)
            clone.reset(commit)
            log = root / LOGS_DIR / f"{name}.log"
            print(f"{name}: runs in {clone.path.relative_to(root)}; DVC's output: {log.relative_to(root)}", flush=True)
            running[clone.start(command, log, workers)] = (clone, name)
        interrupts.pass_on_to_all(list(running), signal.SIGINT)
        for proc in [p for p in running if p.poll() is not None]:
            clone, name = running.pop(proc)
            if proc.returncode == 0:
                clone.push(name, None)
                print(f"{name}: saved; `dvc exp show` lists it", flush=True)
            else:
                failed.append(f"{name} (exit {proc.returncode}; {(root / LOGS_DIR / f'{name}.log').relative_to(root)})")
            free.append(clone)
        time.sleep(POLL_S)
    interrupts.stop_if_any("the replicates (the saved ones are kept; the same command runs the others)")
    if failed:
        raise StageError(f"dvc exp run failed for {', '.join(failed)}; the same command runs what is not saved")
