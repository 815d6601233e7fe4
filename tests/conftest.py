from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from cifar_rounds.demo import init_project, offline_params
from cifar_rounds.params import PARAMS_FILE, Params, load_params
from cifar_rounds.synthetic import write_archive

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """The CPU set up as the stages set it up, before the first parallel operation starts the thread pool."""
    from cifar_rounds.runtime import configure_cpu

    configure_cpu(torch.device("cpu"))
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


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
