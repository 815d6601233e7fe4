from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_rounds.demo import init_project, offline_params
from cifar_rounds.params import Params
from cifar_rounds.synthetic import write_archive

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


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive") / "cifar-10-synthetic.tar.gz"
    return path, write_archive(path, train_size=1500, test_size=400, seed=1)


def make_project(target: Path, archive: tuple[Path, str], **overrides: object) -> Path:
    """A git + DVC project with the real dvc.yaml and src/, on the generated archive."""
    params = offline_params(Params(), archive[0], archive[1], {"train.num_epochs": 3, **overrides})
    init_project(REPO, target, params)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-qm", "baseline"], target)
    return target


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
