"""A sweep's trial in a worker's clone: it trains and reports, whatever the workspace holds, and the workspace stays as
it was."""

from __future__ import annotations

import csv
import io
import json
import sys

import dvc.api
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.data.synthetic import write_archive

from helpers import REPO, make_project, read_json, run

FIXED = {"train.num_epochs": 3, "train.lr_milestones": [2], "train.patience": 3}
SWEEP = {
    "study": "w",
    "baseline": "round-2",
    "trials": 1,
    "enqueue": ["round-2"],  # the one trial: round-2 with the fixed values, exactly what the workspace committed
    "fixed": FIXED,
    "space": {
        "train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [64, 96]},
    },
    "sampler": {"kind": "random", "seed": 0},
    "pruner": {"kind": "none"},
}
QUICK = {
    "data.val_size": 100,
    "diagnostics.sharpness": False,
    "diagnostics.noise_scale": False,
    "tracking.log_model": False,
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trial_with_the_committed_runs_values_trains_and_reports_its_monitors_best_epoch(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=4)
    with_round_2 = {**load_preset("round-2", REPO / "rounds"), **FIXED, **QUICK}
    project = make_project(tmp_path / "p", (archive, md5), **with_round_2)
    run([sys.executable, "-m", "dvc", "repro"], project)  # a finished run: models/last.pt is committed
    (project / "sweeps" / "w.yaml").write_text(yaml.safe_dump(SWEEP))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a finished run and the sweep file"], project)
    workspace_run = read_json(project / "metrics.json")["mlflow_run_id"]
    last_pt = (project / "models" / "last.pt").read_bytes()

    out = run([sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/w.yaml"], project).stdout

    (trial,) = optuna.load_study(study_name="w", storage=f"sqlite:///{project}/optuna.db").trials
    assert trial.params == {"train.learning_rate": 0.05, "train.batch_size": "96"}  # the committed values
    assert trial.state.name == "COMPLETE" and sorted(trial.intermediate_values) == [1, 2, 3], out
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    (trial_run,) = client.search_runs([experiment], "tags.sweep = 'w' and tags.`sweep.trial` = '0'")
    assert trial_run.info.run_id != workspace_run and trial_run.info.status == "FINISHED"
    assert trial_run.data.tags["sweep.trial_state"] == "COMPLETE"
    assert len(client.get_metric_history(trial_run.info.run_id, "val_accuracy")) == 3  # trained here, epoch by epoch
    summary = json.loads(dvc.api.read("reports/train_summary.json", repo=str(project), rev="w-t000"))
    assert summary["mlflow_run_id"] == trial_run.info.run_id
    # the trial's objective: validation accuracy at the epoch train.monitor chose, whose checkpoint a round evaluates
    history = list(csv.DictReader(io.StringIO(dvc.api.read("reports/history.csv", repo=str(project), rev="w-t000"))))
    (chosen,) = [row for row in history if int(row["epoch"]) == summary["best_epoch"]]
    assert trial.value == pytest.approx(float(chosen["val_accuracy"]), abs=1e-12)
    # the workspace's own run is as it was
    assert client.get_run(workspace_run).info.status == "FINISHED"
    assert (project / "models" / "last.pt").read_bytes() == last_pt
    assert read_json(project / "metrics.json")["mlflow_run_id"] == workspace_run
    # a trial scores no test set: its experiment holds no metrics of its own (metrics.json is the commit's)
    assert json.loads(dvc.api.read("metrics.json", repo=str(project), rev="w-t000"))["mlflow_run_id"] == workspace_run
