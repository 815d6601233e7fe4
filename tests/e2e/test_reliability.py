"""Crash, bad input and hostile files: nothing lost, nothing run that should not be."""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.params import with_overrides
from cifar_rounds.stages import train
from cifar_rounds.tracking.lifecycle import terminated_on_exit
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.training.checkpoint import find_resume

from helpers import BAD, env, make_project, read_json, repo_params, run

pytestmark = pytest.mark.slow
EPOCHS = 5
TIMING = {"epoch_time_s", "images_per_s", "peak_memory_mb"}  # measured of the machine, not computed by training


def train_cmd(models: str, history: str, summary: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar_rounds.stages.train",
        "--split",
        "data/split.npz",
        "--models",
        models,
        "--history",
        history,
        "--summary",
        summary,
    ]


def runs(project):
    c = MlflowClient(f"sqlite:///{project}/mlflow.db")
    return c, c.search_runs([c.get_experiment_by_name("cifar-rounds").experiment_id])


@pytest.fixture(scope="module")
def project(tmp_path_factory, archive):
    path = make_project(
        tmp_path_factory.mktemp("reliability"),
        archive,
        **{
            "train.num_epochs": EPOCHS,
            "train.lr_milestones": [2],
            "train.patience": EPOCHS,
            "tracking.log_model": False,
        },
    )
    run(["dvc", "repro"], path)
    return path


def test_training_killed_mid_run_resumes_bit_for_bit_into_the_same_mlflow_run(project):
    cmd = train_cmd("models_killed", "reports/killed.csv", "reports/killed.json")
    proc = subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = project / "reports/killed.csv"
    deadline = time.time() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 3):  # two epochs done
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))  # somewhere inside epoch 3 (or its checkpointing and logging)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(cmd, project).stdout
    assert "resuming from models_killed/last.pt after epoch" in resumed
    reference = read_json(project / "reports/train_summary.json")  # the uninterrupted `dvc repro` run
    killed = read_json(project / "reports/killed.json")
    a = torch.load(project / "models/last.pt", weights_only=True)
    b = torch.load(project / "models_killed/last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(
        torch.equal(x, y)
        for s in a["optimizer"]["state"]
        for x, y in zip(a["optimizer"]["state"][s].values(), b["optimizer"]["state"][s].values())
    )
    # NaN (e.g. a noise scale while the |G|^2 estimate is not yet positive) compares by its text
    strip = lambda h: [{k: repr(v) for k, v in r.items() if k not in TIMING} for r in h]  # noqa: E731
    assert strip(a["progress"]["history"]) == strip(b["progress"]["history"])
    client, _ = runs(project)
    r = client.get_run(killed["mlflow_run_id"])
    assert r.info.status == "FINISHED" and killed["mlflow_run_id"] != reference["mlflow_run_id"]
    for key in ("train_loss", "val_accuracy", "grad_norm_mean"):
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(1, EPOCHS + 1))
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "grad_norm_step")]
    assert len(steps) == len(set(steps))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_ends_killed_not_running(project, sig):
    models = f"models_{sig.name}"
    cmd = train_cmd(models, f"reports/{sig.name}.csv", f"reports/{sig.name}.json")
    # a shell's background jobs inherit SIGINT ignored; give the child the default, as on a terminal
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )
    deadline = time.time() + 300
    while not (project / models / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    state = torch.load(project / models / "last.pt", weights_only=True)
    client, _ = runs(project)
    assert client.get_run(state["progress"]["run_id"]).info.status == "KILLED"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_store_write_lets_the_write_finish_then_ends_the_run_killed(tmp_path, sig):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal, not a background job
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.start(with_overrides(repo_params(), {"tracking.tracking_uri": uri}), {"device": "cpu"})
    log_batch = tracker.client.log_batch

    def interrupted_mid_write(*args, **kwargs):
        os.kill(os.getpid(), sig)  # its Python handler runs before the next line
        return log_batch(*args, **kwargs)

    tracker.client.log_batch = interrupted_mid_write
    after_write = False
    try:
        with pytest.raises(KeyboardInterrupt), terminated_on_exit(tracker):
            tracker.log_metrics({"train_loss": 1.5}, step=1)
            after_write = True
    finally:
        signal.signal(signal.SIGINT, previous)
    run_ = MlflowClient(uri).get_run(tracker.run_id)
    assert not after_write and run_.info.status == "KILLED" and run_.data.metrics == {"train_loss": 1.5}


def _hashes(project):
    files = ["models/best.pt", "models/last.pt", "metrics.json", "reports/history.csv", "data/split.npz"]
    return {f: hashlib.sha256((project / f).read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("changes,field", BAD[:16], ids=[next(iter(c)) for c, _ in BAD[:16]])
def test_bad_params_stop_the_train_stage_before_any_work(project, monkeypatch, capsys, changes, field):
    before, (_, runs_before) = _hashes(project), runs(project)
    good = (project / "params.yaml").read_text()
    raw = yaml.safe_load(good)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", train_cmd("models", "reports/history.csv", "reports/train_summary.json")[2:])
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        with pytest.raises(SystemExit) as exit_:
            run_stage(train.main)
    finally:
        (project / "params.yaml").write_text(good)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and field in err
    assert _hashes(project) == before
    _, runs_after = runs(project)
    assert len(runs_after) == len(runs_before) and "RUNNING" not in {r.info.status for r in runs_after}


def test_diverging_loss_stops_with_epoch_step_and_lr_and_fails_the_run(project):
    good = (project / "params.yaml").read_text()
    raw = yaml.safe_load(good)
    # w <- w (1 - lr * wd) - lr * g: weights grow eightfold per step until they overflow
    raw["train"].update(learning_rate=10.0, momentum=0.0, weight_decay=0.9)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        result = run(train_cmd("models_nan", "reports/nan.csv", "reports/nan.json"), project, check=False)
    finally:
        (project / "params.yaml").write_text(good)
    assert result.returncode == 1
    assert "error: loss became non-finite at epoch" in result.stderr and "learning rate 10" in result.stderr
    client, all_runs = runs(project)
    assert "FAILED" in {r.info.status for r in all_runs}
    bad_epoch = int(re.search(r"at epoch (\d+), step \d+", result.stderr).group(1))
    last = project / "models_nan/last.pt"
    assert last.exists() == (bad_epoch > 1)
    if last.exists():  # the epochs before the divergence are kept, and finite
        state = torch.load(last, weights_only=True)
        assert state["progress"]["epoch"] == bad_epoch - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"model": exploit}, tmp_path / "last.pt")
    with pytest.raises(StageError, match="not a loadable checkpoint"):
        find_resume(tmp_path / "last.pt", "any identity")
    assert not marker.exists()
