"""What tests share: the repository, the environment for the pipeline's commands, projects and servers they start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar_rounds.cli.demo import init_project, offline_params
from cifar_rounds.core.names import MLFLOW_SERVER_QUIET_ENV
from cifar_rounds.core.params import PARAMS_FILE, Params, load_params

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def env(**extra: str) -> dict[str, str]:
    """The environment for the pipeline's commands: this venv first, no inherited MLflow/DVC settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**base, "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}", **extra}


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def repo_params() -> Params:
    """The repository's params.yaml: the working values every test starts from."""
    return load_params(REPO / PARAMS_FILE)


def make_project(target: Path, archive: tuple[Path, str], **overrides: object) -> Path:
    """A git + DVC project with the real dvc.yaml and src/, on the generated archive."""
    params = offline_params(repo_params(), archive[0], archive[1], {"train.num_epochs": 3, **overrides})
    init_project(REPO, target, params)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-qm", "baseline"], target)
    return target


def repository_copy(target: Path) -> Path:
    """The repository's files (tracked and new, as git lists them) with this .venv linked: a fresh clone, set up.

    The .venv is set up here first, for the pins as they are now: the copy's own `scripts/setup.sh`, finding it
    stale, would install the package into it from the copy, which is deleted after the test.
    """
    run(["scripts/setup.sh"], REPO)
    files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    (target / ".venv").symlink_to(REPO / ".venv")
    return target


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(cmd: list[str], cwd: Path, probe: str, timeout_s: float = 120, **extra_env: str) -> Iterator[None]:
    """A server this test starts as `cmd`, in its own process group; ready once `probe` (a URL) answers.

    Afterwards that group alone is stopped: the server and the workers it started. An MLflow server runs
    without its job runner (MLFLOW_SERVER_QUIET_ENV).
    """
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env(**{**MLFLOW_SERVER_QUIET_ENV, **extra_env}),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.time() + timeout_s
            while True:
                try:
                    urllib.request.urlopen(probe, timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        log.seek(0)
                        raise AssertionError(f"{' '.join(cmd[:4])} did not answer {probe}:\n{log.read()[-3000:]}")
                    time.sleep(0.5)
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def tracking_server(backend: str, artifacts: Path, *options: str, **extra_env: str) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over `backend`, artifacts in `artifacts`, with more `options` (`--app-name
    basic-auth`) and environment; started and stopped here; its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
        "--workers",
        "1",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(artifacts),
        *options,
    ]
    with serving(cmd, artifacts.parent, f"{url}/health", 180, **extra_env):
        yield url


# the seven values round 2 of the founding analysis changes from round 1
SEED_CHANGES = {
    "train.learning_rate",
    "train.lr_gamma",
    "train.weight_decay",
    "train.batch_size",
    "train.num_epochs",
    "train.patience",
    "train.min_delta",
}

# params.yaml changes that must be refused, with a word the error must name
BAD = [
    ({"train.learning_rat": 0.1}, "learning_rat"),
    ({"train.learning_rate": -0.1}, "train.learning_rate"),
    ({"train.learning_rate": 0}, "train.learning_rate"),
    ({"train.learning_rate": "0.05"}, "train.learning_rate"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": 96.5}, "train.batch_size"),
    ({"train.lr_milestones": [120, 60, 160]}, "lr_milestones"),
    ({"train.lr_milestones": [60, 60]}, "lr_milestones"),
    ({"train.lr_milestones": [60, 120, 300]}, "lr_milestones"),
    ({"train.lr_gamma": 0}, "train.lr_gamma"),
    ({"train.lr_gamma": 1.5}, "train.lr_gamma"),
    ({"train.momentum": 1.0}, "train.momentum"),
    ({"train.monitor": "val_acc"}, "train.monitor"),
    ({"train.nesterov": "yes"}, "train.nesterov"),
    ({"train.patience": 0}, "train.patience"),
    ({"train.min_delta": -0.001}, "train.min_delta"),
    ({"train.precision": "fp16"}, "train.precision"),
    ({"data.val_size": 50000}, "data.val_size"),
    ({"data.md5": "not-a-checksum"}, "data.md5"),
    ({"model.width": 0}, "model.width"),
    ({"tracking.grad_norm_interval": 0}, "tracking.grad_norm_interval"),
    ({"train.min_delta": float("inf")}, "train.min_delta"),
    ({"train.min_delta": float("nan")}, "train.min_delta"),
    ({"data.seed": 2**64}, "data.seed"),
    ({"diagnostics.sharpness_epochs": [0]}, "diagnostics.sharpness_epochs"),
    ({"diagnostics.sharpness_epochs": [251]}, "diagnostics.sharpness_epochs"),
]
