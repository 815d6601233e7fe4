"""The README's offline command, then the README's after-a-run commands in the repository it leaves."""

import re
import shlex
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, read_json, run

pytestmark = pytest.mark.slow


def readme_block(marker: str) -> list[str]:
    """The commands of the README's fenced block after `<!-- marker ... -->`, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {marker}.*?-->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_offline_demo_leaves_a_committed_repository_where_the_readme_commands_work(tmp_path):
    before = (REPO / "params.yaml").read_bytes()
    demo = tmp_path / "demo"
    out = run([sys.executable, "-m", "cifar_rounds.demo", "--dir", str(demo)], REPO).stdout
    for stage in ("download", "split", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "offline run complete" in out
    metrics = read_json(demo / "metrics.json")
    assert metrics["test_accuracy"] > 0.3 and metrics["stopped_epoch"] >= 1
    assert (REPO / "params.yaml").read_bytes() == before
    log = run(["git", "log", "--format=%s"], demo).stdout.splitlines()
    assert len(log) == 2 and run(["git", "status", "--porcelain"], demo).stdout == ""
    commands = readme_block("after-a-run")
    assert commands[0] == "dvc metrics show"
    outputs = {cmd: run(shlex.split(cmd), demo).stdout for cmd in commands}  # each exits 0
    assert "test_accuracy" in outputs["dvc metrics show"]
    assert "test_accuracy" in outputs["dvc metrics diff HEAD~1"]  # the run's metrics against the commit before
    assert (demo / "dvc_plots" / "index.html").exists()
    assert "dvc_plots/" in (demo / ".gitignore").read_text()
    run_ = MlflowClient(f"sqlite:///{demo}/mlflow.db").get_run(metrics["mlflow_run_id"])
    assert run_.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD~1"], demo).stdout.strip()
