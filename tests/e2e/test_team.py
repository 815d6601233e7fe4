"""A team's setup: a shared `mlflow server` and a DVC remote, so a teammate restores a round without retraining."""

import pytest
from mlflow.tracking import MlflowClient

from helpers import make_project, read_json, run

pytestmark = pytest.mark.slow


def test_push_clone_pull_reruns_nothing_and_runs_are_on_the_server(tmp_path, archive, mlflow_server):
    project = make_project(
        tmp_path / "p", archive, **{"train.num_epochs": 2, "train.lr_milestones": [1], "tracking.log_model": False}
    )
    run(["dvc", "remote", "add", "-d", "team", str(tmp_path / "remote")], project)
    run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "round"], project)
    run(["dvc", "push"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "models/best.pt").read_bytes() == (project / "models/best.pt").read_bytes()
    out = run(["dvc", "repro"], clone, MLFLOW_TRACKING_URI=mlflow_server).stdout
    assert "Running stage" not in out
    assert "up to date" in run(["dvc", "status"], clone).stdout

    run_id = read_json(clone / "metrics.json")["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    r = client.get_run(run_id)
    assert (
        r.info.status == "FINISHED"
        and r.data.metrics["test_accuracy"] == read_json(clone / "metrics.json")["test_accuracy"]
    )
