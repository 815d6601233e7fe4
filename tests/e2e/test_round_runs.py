"""`rounds run` interrupted and rerun, rounds named apart from their preset and found through MLflow alone,
and a revision whose measurements the report cannot read."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.replicates import ArtifactPaths, find_round
from cifar_rounds.core.params import load_params
from cifar_rounds.data.synthetic import write_archive

from helpers import env, make_project, run

EPOCHS = 4
ROUNDS = [sys.executable, "-m", "cifar_rounds.analysis.rounds", "run"]
REPORT = [sys.executable, "-m", "cifar_rounds.analysis.report"]


@pytest.fixture
def project(tmp_path):
    archive = tmp_path / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=2)
    return make_project(
        tmp_path / "p",
        (archive, md5),
        **{
            "data.val_size": 50,
            "model.width": 8,
            "train.lr_milestones": [1],
            "tracking.log_model": False,
            "diagnostics.noise_scale": False,
            "diagnostics.sharpness": False,
            "report.min_test_accuracy": 0.0,
            "report.max_train_test_gap": 1.0,
            "report.max_val_loss_rise": 1000.0,
        },
    )


def mlflow_runs(project) -> list:
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("cifar-rounds").experiment_id])


def exp_names(project) -> list[str]:
    out = run(["dvc", "exp", "ls", "--name-only"], project).stdout.split()
    return sorted(name for name in out if re.fullmatch(r"[\w-]+-s\d+", name))


def output(cmd: list[str], project) -> str:
    result = run(cmd, project)
    return result.stdout + result.stderr


def wait_for(path, pattern: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, path.read_text(), re.S):
        assert proc.poll() is None, f"ended before {pattern!r}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {timeout_s} s"
        time.sleep(0.2)


def test_ctrl_c_puts_params_yaml_back_and_a_rerun_runs_only_the_replicates_not_finished(project, tmp_path):
    before = (project / "params.yaml").read_bytes()
    command = [*ROUNDS, "round-2", "-n", "r2", "--seeds", "2", "--epochs", str(EPOCHS)]
    log = tmp_path / "rounds.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=project, env=env(), start_new_session=True, stdout=out, stderr=out)
    try:
        # the first replicate has finished, and the second is training
        wait_for(log, r"Ran experiment\(s\): r2-s0.*epoch 1/", proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it: to the process group
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = log.read_text().strip().splitlines()[-1]  # after DVC's and the stage's lines: its own
    assert proc.returncode == 130 and last.startswith("interrupted by signal 2 at r2-s1 (params.yaml is as it was)")
    assert (project / "params.yaml").read_bytes() == before  # not the interrupted replicate's values
    assert exp_names(project) == ["r2-s0"]
    assert {r.data.tags["seed"]: r.info.status for r in mlflow_runs(project)} == {"0": "FINISHED", "1": "KILLED"}

    again = output(command, project)  # the same command continues
    assert "r2-s0: finished" in again and "skipped" in again and "Reproducing experiment 'r2-s0'" not in again
    assert exp_names(project) == ["r2-s0", "r2-s1"]
    more = output([*ROUNDS, "round-2", "-n", "r2", "--seeds", "3", "--epochs", str(EPOCHS)], project)
    assert more.count("skipped") == 2 and "Reproducing experiment 'r2-s2'" in more
    assert exp_names(project) == ["r2-s0", "r2-s1", "r2-s2"]
    found = mlflow_runs(project)
    statuses = {s: sorted(r.info.status for r in found if r.data.tags["seed"] == s) for s in "012"}
    # finished seeds were not trained again; the interrupted one started over (DVC checks out the last
    # saved outputs before an experiment), its first run left KILLED
    assert statuses == {"0": ["FINISHED"], "1": ["FINISHED", "KILLED"], "2": ["FINISHED"]}
    tags = {r.data.tags["seed"]: r.data.tags for r in found if r.info.status == "FINISHED"}
    assert [tags[s]["planned_seeds"] for s in "012"] == ["2", "2", "3"]
    assert {(t["round"], t["preset"]) for t in tags.values()} == {("r2", "round-2")}


def test_a_round_named_apart_from_its_preset_is_its_own_round_in_mlflow_and_the_report(project, monkeypatch):
    run([*ROUNDS, "round-1", "--epochs", "2"], project)  # one seed a side: names, not statistics
    run([*ROUNDS, "round-1", "-n", "round-3", "--epochs", "2", "-S", "train.patience=7"], project)
    tags = {r.info.run_name: r.data.tags for r in mlflow_runs(project)}
    assert {name: (t["round"], t["preset"]) for name, t in tags.items()} == {
        "round-1": ("round-1", "round-1"),
        "round-3": ("round-3", "round-1"),
    }
    run(["dvc", "exp", "remove", "--all-commits"], project)  # no DVC experiments: MLflow alone holds the rounds
    assert exp_names(project) == []
    run([*REPORT, "round-1", "round-3", "--out", "reports/mlflow.md"], project)
    report = (project / "reports/mlflow.md").read_text()
    assert "Seeds: 1 (round-1)" in report and "Seeds: 1 (round-3)" in report
    assert re.findall(r"^\| `([\w.]+)` \|", report, re.M) == ["train.patience"]  # the configurations' one change
    monkeypatch.chdir(project)
    paths = ArtifactPaths.from_dvc(project)
    for name in ("round-1", "round-3"):
        found = find_round(name, load_params(), project, paths)
        assert [rep.label for rep in found.replicates] == [name]


def test_a_new_round_with_the_last_runs_values_trains_its_own_runs(project, monkeypatch):
    run([*ROUNDS, "round-1", "-n", "rond", "--epochs", "2"], project)
    kk = [*ROUNDS, "round-1", "-n", "kk", "--seeds", "2", "--epochs", "2"]
    out = output(kk, project)
    assert "Stage 'train' didn't change" not in out, out[-3000:]
    runs = {(r.data.tags["round"], r.data.tags["seed"]): r for r in mlflow_runs(project)}
    assert sorted(runs) == [("kk", "0"), ("kk", "1"), ("rond", "0")]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    monkeypatch.chdir(project)
    found = find_round("kk", load_params(), project, ArtifactPaths.from_dvc(project))
    # each replicate's measurements are its own run's, tagged with its round, never rond's
    assert [rep.metrics["mlflow_run_id"] for rep in found.replicates] == [
        runs[("kk", "0")].info.run_id,
        runs[("kk", "1")].info.run_id,
    ]
    # a rerun with more seeds trains only the new ones: the Ctrl-C test above


def test_a_revision_whose_metrics_the_report_cannot_read_is_one_line_naming_it_and_the_key(project):
    history = "epoch,train_accuracy,val_accuracy,train_loss,val_loss,learning_rate\n1,0.5,0.4,1.2,1.3,0.05\n"
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports/history.csv").write_text(history)
    (project / "reports/test_predictions.csv").write_text("index,actual,predicted\n0,cat,dog\n")
    metrics = {"test_accuracy": 0.5, "val_accuracy": 0.4, "train_loss": 1.2, "val_loss": 1.3, "best_epoch": 1}
    for tag, content in (("lacking", {**metrics, "stopped_epoch": 1, "mlflow_run_id": "x"}), ("listed", [metrics])):
        (project / "metrics.json").write_text(json.dumps(content))
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", tag], project)
        run(["git", "tag", tag], project)
    for args, message in (
        (["lacking", "listed"], "error: lacking: its metrics.json lacks 'train_accuracy'"),
        (["listed", "lacking"], "error: listed: its metrics.json is a JSON list, expected an object"),
    ):
        result = run([*REPORT, *args], project, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
        assert result.stderr.startswith(message), result.stderr
