"""MLflow beyond the default store: a real `mlflow server`, DVC's temporary copies, `mlflow run`."""

import json
import sys

import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.rounds import preset_names

from helpers import REPO, make_project, read_json, run

pytestmark = pytest.mark.slow
TWO_EPOCHS = {"train.num_epochs": 2, "train.lr_milestones": [1]}
NO_MODEL = {"tracking.log_model": False}  # the model's logging is checked once, over the server; it costs seconds a run


def finished_runs(client: MlflowClient, experiment: str = "cifar-rounds"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_pipeline_logs_to_a_real_mlflow_server_over_http(tmp_path, archive, mlflow_server):
    project = make_project(tmp_path / "p", archive, **TWO_EPOCHS)
    run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=mlflow_server)
    assert not (project / "mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    (r,) = finished_runs(client)
    assert r.info.status == "FINISHED" and r.info.run_id == read_json(project / "metrics.json")["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]
    assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"checkpoints", "evaluation"}
    (logged,) = client.search_logged_models([r.info.experiment_id])  # the model, uploaded through the server
    assert logged.status == LoggedModelStatus.READY and {m.key for m in logged.metrics} >= {"test_accuracy"}
    (version,) = client.search_model_versions(f"run_id = '{r.info.run_id}'")
    assert version.source == f"models:/{logged.model_id}"


def test_an_experiment_run_in_dvcs_temporary_copy_lands_in_the_root_store(tmp_path, archive):
    # `--temp` runs where `rounds run --queue`'s experiments run: a copy under .dvc/tmp/exps
    project = make_project(tmp_path / "p", archive, **TWO_EPOCHS, **NO_MODEL)
    run(["dvc", "exp", "run", "--temp", "-n", "q0", "-S", "train.lr_gamma=0.2"], project)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (r,) = finished_runs(client)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    exp_run_ids = {
        e["name"]: e["data"]["metrics"]["metrics.json"]["data"]["mlflow_run_id"]
        for baseline in shown
        for e in (x for exps in baseline["experiments"] or [] for x in exps["revs"])
    }
    assert r.info.status == "FINISHED" and r.data.tags["dvc_exp_name"] == r.info.run_name == "q0"
    assert r.data.params["train.lr_gamma"] == "0.2"
    assert r.info.artifact_uri.startswith(f"file://{project}/mlartifacts/")
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] == [1, 2]
    assert exp_run_ids == {"q0": r.info.run_id}
    assert (project / "mlartifacts").is_dir() and not list((project / ".dvc" / "tmp").rglob("mlflow.db"))


def test_mlflow_run_entry_point_runs_the_pipeline_without_touching_params(tmp_path, archive):
    project = make_project(tmp_path / "p", archive, **{"train.lr_milestones": [1]}, **NO_MODEL)
    before = (project / "params.yaml").read_text()
    run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            ".",
            "--env-manager",
            "local",
            "--experiment-name",
            "cifar-rounds",
            "-P",
            "preset=round-1",
            "-P",
            "overrides=train.num_epochs=2 train.lr_milestones=[1] train.lr_gamma=0.5",
        ],
        project,
    )
    assert (project / "params.yaml").read_text() == before
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (r,) = finished_runs(client)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.num_epochs"] == "2" and r.data.params["train.lr_gamma"] == "0.5"
    assert r.data.params["train.learning_rate"] == "0.01" and r.data.tags["round"] == "round-1"  # the preset's
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2]


def test_conda_env_and_mlproject_pin_what_requirements_pin():
    pins = {
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pins == {p for p in pip_section if "==" in p}
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    main = project["entry_points"]["main"]
    # no hyperparameter values here: a preset name, and overrides passed through
    assert set(main["parameters"]) == {"preset", "overrides"}
    assert main["parameters"]["preset"]["default"] in preset_names(REPO / "rounds")
    assert main["command"].startswith("python -m cifar_rounds.analysis.rounds run {preset} --temp")
    assert {"download", "split", "train", "evaluate"} <= project["entry_points"].keys()
