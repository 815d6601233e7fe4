"""The seed's two rounds as DVC experiments, compared by DVC, MLflow and the round report."""

import csv
import io
import json
import re

import dvc.api
import pytest
from mlflow.tracking import MlflowClient

from cifar_rounds.cli import StageError
from cifar_rounds.params import load_params
from cifar_rounds.report import ArtifactPaths, Round, condition_lines, from_mlflow, mcnemar_exact, wilson_interval
from cifar_rounds.rounds import load_preset, scaled_milestones
from cifar_rounds.synthetic import write_archive
from conftest import REPO, make_project, repo_params, run

SEED_CHANGES = {"train.learning_rate", "train.lr_gamma", "train.weight_decay", "train.batch_size",
                "train.num_epochs", "train.patience", "train.min_delta"}


def test_mcnemar_exact_matches_hand_computed_binomial_tails():
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # n = 10, k <= 2
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)


def test_wilson_interval_contains_the_estimate_and_narrows_with_n():
    lo, hi = wilson_interval(8329, 10000)
    assert lo < 0.8329 < hi and hi - lo == pytest.approx(0.0146, abs=5e-4)
    lo_small, hi_small = wilson_interval(83, 100)
    assert hi_small - lo_small > hi - lo


def test_presets_are_the_seed_rounds_and_differ_in_exactly_seven_values(monkeypatch):
    monkeypatch.chdir(REPO)
    one, two = load_preset("round-1"), load_preset("round-2")
    assert one["train.learning_rate"] == 0.01 and two["train.batch_size"] == 96
    assert one.keys() == two.keys()
    assert {k for k in one if one[k] != two[k]} == SEED_CHANGES


def test_a_preset_with_a_bad_value_or_key_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "bad.yaml").write_text("train:\n  learning_rate: -1\n")
    (tmp_path / "typo.yaml").write_text("train:\n  lr: 0.1\n")
    with pytest.raises(StageError, match="bad.yaml: overrides: train.learning_rate"):
        load_preset("bad", tmp_path)
    with pytest.raises(StageError, match="unknown parameter 'train.lr'"):
        load_preset("typo", tmp_path)
    with pytest.raises(StageError, match="no such preset; presets here: bad, typo"):
        load_preset("round-9", tmp_path)


def test_shortened_runs_keep_their_milestones_at_the_same_fractions():
    assert scaled_milestones([60, 120, 160], 200, 4) == [1, 2, 3]
    assert scaled_milestones([60, 120, 160], 250, 10) == [2, 5, 6]
    assert scaled_milestones([60, 120, 160], 200, 2) == [1]  # collisions merge; none reaches the end


def test_report_flags_rounds_trained_under_different_conditions():
    fp32, bf16 = (Round(label, repo_params(), {"device": "cpu", "precision": p}, [], []) for label, p in (("a", "fp32"), ("b", "bf16")))
    lines = condition_lines(fp32, bf16)
    assert "- precision: fp32 -> bf16 (changed)" in lines and "- device: cpu" in lines
    assert any("different conditions" in line for line in lines)
    assert not any("different conditions" in line for line in condition_lines(fp32, fp32))


@pytest.fixture(scope="module")
def rounds_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    archive = tmp / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=2)
    project = make_project(tmp / "p", (archive, md5), **{"data.val_size": 50, "model.width": 4, "train.lr_milestones": [1]})
    for preset in ("round-1", "round-2"):
        run(["python", "-m", "cifar_rounds.rounds", "run", preset], project)
    return project


@pytest.mark.slow
def test_dvc_compares_the_two_rounds(rounds_project):
    diff = json.loads(run(["dvc", "params", "diff", "round-1", "round-2", "--json"], rounds_project).stdout)
    assert set(diff["params.yaml"]) == SEED_CHANGES
    assert diff["params.yaml"]["train.learning_rate"]["old"] == 0.01
    assert diff["params.yaml"]["train.learning_rate"]["new"] == 0.05
    # --all: tiny rounds can tie on test accuracy, and a plain diff lists changed values only
    metrics = json.loads(run(["dvc", "metrics", "diff", "round-1", "round-2", "--all", "--json"], rounds_project).stdout)
    accuracy = metrics["metrics.json"]["test_accuracy"]
    assert (accuracy["old"], accuracy["new"]) == tuple(_metrics(rounds_project, r)["test_accuracy"] for r in ("round-1", "round-2"))
    plots = run(["dvc", "plots", "diff", "round-1", "round-2", "--json"], rounds_project).stdout
    assert "round-1" in plots and "round-2" in plots
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    exp = client.get_experiment_by_name("cifar-rounds")
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["round-1", "round-2"]


def _metrics(project, rev):
    return json.loads(dvc.api.read("metrics.json", repo=str(project), rev=rev))


def _predictions(project, rev):
    return list(csv.DictReader(io.StringIO(dvc.api.read("reports/test_predictions.csv", repo=str(project), rev=rev))))


@pytest.mark.slow
def test_report_numbers_come_from_the_rounds_measurements(rounds_project):
    run(["python", "-m", "cifar_rounds.report", "round-1", "round-2"], rounds_project)
    report = (rounds_project / "reports/round-round-1-vs-round-2.md").read_text()
    assert (rounds_project / "reports/round-round-1-vs-round-2.png").read_bytes()[:4] == b"\x89PNG"
    m1, m2 = _metrics(rounds_project, "round-1"), _metrics(rounds_project, "round-2")
    assert f"- Test accuracy: {m1['test_accuracy']:.2%} -> {m2['test_accuracy']:.2%}" in report
    assert f"- Stopped at epoch: {m1['stopped_epoch']} -> {m2['stopped_epoch']}" in report
    assert f"- Validation loss: {m1['val_loss']:.4f} -> {m2['val_loss']:.4f}" in report
    changed = set(re.findall(r"^\| `([\w.]+)` \|", report, re.M))
    assert changed == SEED_CHANGES
    p1, p2 = _predictions(rounds_project, "round-1"), _predictions(rounds_project, "round-2")
    b = sum(x["predicted"] == x["actual"] != y["predicted"] for x, y in zip(p1, p2))
    c = sum(y["predicted"] == y["actual"] != x["predicted"] for x, y in zip(p1, p2))
    assert f"{b} images only round-1 got right, {c} only round-2 got right; p = {mcnemar_exact(b, c):.4g}" in report
    assert "Success criteria" in report and "test accuracy > 88.00%" in report
    assert f"- precision: {m1['precision']}\n" in report and "(changed)" not in report  # same machine
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(m2["mlflow_run_id"], "report")}
    assert artifacts == {"report/round-round-1-vs-round-2.md", "report/round-round-1-vs-round-2.png"}


@pytest.mark.slow
def test_a_round_can_be_read_back_from_mlflow_alone(rounds_project, monkeypatch):
    monkeypatch.chdir(rounds_project)
    params = load_params(rounds_project / "params.yaml")
    r = from_mlflow(params, "round-1", ArtifactPaths.from_dvc(rounds_project))
    assert r.metrics == _metrics(rounds_project, "round-1")
    assert r.params.train.learning_rate == 0.01 and len(r.predictions) == 100
