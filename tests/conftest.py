from __future__ import annotations

import json
import os
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

import pytest
import torch

from cifar_rounds.demo import init_project, offline_params
from cifar_rounds.params import PARAMS_FILE, Params, load_params
from cifar_rounds.synthetic import write_archive

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """The CPU set up as the stages set it up, before the first parallel operation starts the thread pool.

    Under pytest-xdist each worker, and every process its tests start, gets one thread: two
    workers of two threads each on two cores spin against each other and run many times slower
    (benchmarks/concurrent_trials.py).
    """
    from cifar_rounds.runtime import configure_cpu

    configure_cpu(torch.device("cpu"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
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


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive") / "cifar-10-synthetic.tar.gz"
    return path, write_archive(path, train_size=1500, test_size=400, seed=1)


def make_project(target: Path, archive: tuple[Path, str], **overrides: object) -> Path:
    """A git + DVC project with the real dvc.yaml and src/, on the generated archive."""
    params = offline_params(repo_params(), archive[0], archive[1], {"train.num_epochs": 3, **overrides})
    init_project(REPO, target, params)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-qm", "baseline"], target)
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

    Afterwards that group alone is stopped: the server and the workers it started.
    """
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
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


@pytest.fixture
def mlflow_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    with serving(cmd, tmp_path, f"{url}/health", 90):
        yield url
