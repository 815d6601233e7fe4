"""A real PostgreSQL on 127.0.0.1 for the tests of shared stores, from pgserver's binaries (installed by pip)."""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pgserver

from helpers import free_port

# the projects of the shared-store tests: tiny trials, nothing logged that they do not check
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
PG_USER = "cifar-rounds-pg"  # PostgreSQL refuses to run as root: as root, the server runs as this user


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

    def psql(self, sql: str, check: bool = True, **pg_env: str) -> subprocess.CompletedProcess:
        """`sql` run over TCP as the superuser, never prompting; libpq's settings (PGPASSWORD) from `pg_env` only."""
        cmd = [self.bin / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-w", "-qc", sql]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "PGPASSFILE": os.devnull, **pg_env}
        return subprocess.run(cmd, check=check, capture_output=True, text=True, env=env)

    def create(self, database: str) -> None:
        self.psql(f"CREATE DATABASE {database}")

    def require_password(self, password: str) -> None:
        """From now on a connection over TCP (every client's, psycopg2's too) must give the superuser's password,
        `password`; the server's own socket stays trusted."""
        self.psql(f"ALTER ROLE postgres PASSWORD '{password}'")
        (self.folder / "data" / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
        )
        self.psql("SELECT pg_reload_conf()")

    def log(self) -> str:
        return (self.folder / "server.log").read_text()[-2000:]


@contextmanager
def postgresql() -> Iterator[Postgres]:
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
