"""Several machines, one study, one tracking store: a real PostgreSQL behind Optuna and an `mlflow server`.

Two clones of the project stand for two machines: each has its own DVC queue and its own sweep
driver, on one study in PostgreSQL and one tracking server whose backend store is PostgreSQL. Their
experiments travel through a shared git and DVC remote to a third clone, which compares them.
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pgserver
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import env, free_port, make_project, run, tracking_server

PG_USER = "cifar-rounds-pg"  # PostgreSQL refuses to run as root: as root, the server runs as this user
TRIALS = 4
SMALL = {
    "data.val_size": 60,
    "model.width": 8,
    "train.batch_size": 60,
    "train.num_epochs": 2,
    "train.lr_milestones": [1],
    "train.patience": 2,
    "diagnostics.noise_scale": False,
    "diagnostics.sharpness": False,
    "tracking.log_model": False,
    "tracking.system_metrics_interval_s": 0,
}


def server_user() -> str | None:
    """The unprivileged user the server runs as when this process is root (created once); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return PG_USER


class Postgres:
    """A PostgreSQL server on 127.0.0.1 from pgserver's binaries, in a folder its user owns; started and stopped
    (by its own process group) by the test."""

    def __init__(self, folder: Path) -> None:
        user = server_user()
        package = Path(pgserver.__file__).parent
        self.folder, self.bin = folder, folder / "pgserver" / "pginstall" / "bin"
        # copies the server's user can read (the checkout may not be); the binaries find their libraries
        # relative to themselves ($ORIGIN/../../../pgserver.libs)
        shutil.copytree(package / "pginstall", folder / "pgserver" / "pginstall")
        shutil.copytree(package.parent / "pgserver.libs", folder / "pgserver.libs")
        self.as_user = ["runuser", "-u", user, "--"] if user else []
        if user:
            for path in [folder, *folder.rglob("*")]:
                shutil.chown(path, user)
        self.port, self.proc = free_port(), None
        initdb = [*self.as_user, self.bin / "initdb", "-D", folder / "data", "-U", "postgres", "--auth=trust"]
        subprocess.run(initdb, check=True, capture_output=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        log = open(self.folder / "server.log", "a")
        data, port = self.folder / "data", str(self.port)
        cmd = [*self.as_user, self.bin / "postgres", "-D", data, "-h", "127.0.0.1", "-p", port, "-k", self.folder]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.time() + 60
        ready = [self.bin / "pg_isready", "-h", "127.0.0.1", "-p", port]
        while subprocess.run(ready, capture_output=True).returncode != 0:
            assert self.proc.poll() is None and time.time() < deadline, self.log()
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown of this server and its workers only
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def create(self, database: str) -> None:
        psql = [self.bin / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        subprocess.run([*psql, "-qc", f"CREATE DATABASE {database}"], check=True, capture_output=True)

    def log(self) -> str:
        return (self.folder / "server.log").read_text()[-2000:]


@contextmanager
def postgresql() -> Postgres:
    folder = Path(tempfile.mkdtemp(prefix="cifar-rounds-pg-"))
    server = None
    try:
        server = Postgres(folder)
        server.start()
        for database in ("optuna", "mlflow"):
            server.create(database)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def machine(origin: Path, target: Path) -> Path:
    """A clone of the shared repository: another machine with its own queue."""
    run(["git", "clone", "-q", str(origin), str(target)], origin.parent)
    run(["git", "config", "user.email", "pipeline@localhost"], target)
    run(["git", "config", "user.name", "cifar-rounds"], target)
    return target


@pytest.mark.timeout(2400)
def test_two_machines_run_one_study_on_postgresql_and_a_third_compares_their_rounds(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=360, test_size=100, seed=4)
    first = make_project(tmp_path / "first", (archive, md5), **SMALL)
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], first)
    with postgresql() as pg, tracking_server(pg.url("mlflow"), tmp_path / "artifacts") as server:
        sweep = {
            "study": "team",
            "baseline": "round-2",
            "trials": TRIALS,
            "storage": pg.url("optuna"),
            "fixed": {"train.num_epochs": 2, "train.lr_milestones": [1], "train.patience": 2},
            "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
            "sampler": {"kind": "random", "seed": 1},
            "pruner": {"kind": "none"},
        }
        (first / "sweeps" / "team.yaml").write_text(yaml.safe_dump(sweep))
        run(["git", "add", "-A"], first)
        run(["git", "commit", "-qm", "team sweep"], first)
        run(["git", "remote", "add", "origin", str(origin)], first)
        run(["git", "push", "-q", "origin", "main"], first)
        second = machine(origin, tmp_path / "second")
        shared = {"MLFLOW_TRACKING_URI": server}
        cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/team.yaml", "--workers", "1"]
        started = time.time()
        drivers = [
            subprocess.Popen(
                cmd,
                cwd=m,
                env=env(**shared),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for m in (first, second)
        ]
        try:
            outs = [d.communicate(timeout=1500)[0] for d in drivers]
        finally:
            for d in drivers:
                if d.poll() is None:
                    os.killpg(d.pid, signal.SIGKILL)
        assert [d.returncode for d in drivers] == [0, 0], "\n".join(o[-2000:] for o in outs)
        print(f"two drivers, one worker each: the study's {TRIALS} trials in {time.time() - started:.0f} s")

        study = optuna.load_study(study_name="team", storage=pg.url("optuna"))
        counted = [t for t in study.trials if not t.user_attrs.get("retried")]
        assert len(counted) == TRIALS and all(t.state.name == "COMPLETE" for t in counted)  # the budget, across both
        machines = {t.user_attrs["queue"] for t in counted}
        print("trials per machine:", {q: sum(t.user_attrs["queue"] == q for t in counted) for q in machines})
        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
        runs = [r for r in client.search_runs([experiment], "tags.sweep = 'team'") if "sweep.trial" in r.data.tags]
        numbers = sorted(int(r.data.tags["sweep.trial"]) for r in runs)
        assert numbers == sorted(t.number for t in counted)  # each trial one run, none run twice
        assert {r.info.status for r in runs} == {"FINISHED"}

        # a round on each machine, shared through the remotes and compared on a third
        for m, preset in ((first, "round-1"), (second, "round-2")):
            run(
                [sys.executable, "-m", "cifar_rounds.analysis.rounds", "run", preset, "--seeds", "1", "--epochs", "2"],
                m,
                **shared,
            )
            run(["dvc", "exp", "push", "origin", f"{preset}-s0"], m)
        third = machine(origin, tmp_path / "third")
        run(["dvc", "exp", "pull", "origin", "round-1-s0", "round-2-s0"], third)
        report = run([sys.executable, "-m", "cifar_rounds.analysis.report", "round-1", "round-2"], third, **shared)
        assert "round-1" in report.stdout and "round-2" in report.stdout, report.stdout[-2000:]
        promoted = run(cmd[:4] + ["--no-run", "--promote", "team-best"], third, **shared)
        assert (third / "rounds" / "team-best.yaml").exists(), promoted.stdout[-2000:]
