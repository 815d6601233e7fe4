"""A sweep through DVC's queue, end to end: killed, resumed, pruned, promoted to a round."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import dvc.api
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.report import share_running

from helpers import env, make_project, read_json, run, wait_for_queue_workers_to_exit

TRIAL_SETTINGS = {
    "data.val_size": 100,
    "diagnostics.sharpness": False,
    "diagnostics.noise_scale": False,
    "tracking.log_model": False,
}
TINY_SWEEP = {
    "study": "s",
    "baseline": "round-2",
    "trials": 6,
    "enqueue": ["round-1", "round-2"],
    "schedule": {"train.num_epochs": 3, "train.lr_milestones": [2], "train.patience": 3},
    # log-uniform down to 1e-5: round-1 and most random draws learn nothing in 3 epochs on these images, and the
    # pruner stops those still at chance after 2, whichever trials trained before them (a median pruner's
    # references are the trials trained so far: in which order the queue trains them is not the test's to choose)
    "space": {
        "train.learning_rate": {"type": "float", "low": 0.00001, "high": 0.1, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [64, 96, 128]},
    },
    "sampler": {"kind": "random", "seed": 3},
    "pruner": {"kind": "threshold", "lower": 0.11, "warmup_epochs": 2},
}


def _trials(project: Path) -> list:
    """The study's trials; none before the driver has created it.

    Read-only until the study is there: opening the storage earlier would race the driver's
    schema creation.
    """
    try:
        with closing(sqlite3.connect(f"file:{project / 'optuna.db'}?mode=ro", uri=True)) as con:
            if not con.execute("SELECT 1 FROM studies WHERE study_name = 's'").fetchone():
                return []
    except sqlite3.OperationalError:  # no database, or no tables yet
        return []
    return optuna.load_study(study_name="s", storage=f"sqlite:///{project}/optuna.db").trials


def _queue_lines(project: Path, state: str) -> list[str]:
    """Names of the queue's experiments in `state`."""
    status = run([sys.executable, "-m", "dvc", "queue", "status"], project).stdout.splitlines()
    return [line.split()[1] for line in status if line.endswith(state)]


def _kill_a_running_trial(project: Path) -> str:
    """SIGKILL one trial's running experiment (`dvc queue kill --force`); its name.

    Queued trials are waited for: the driver is dead, the workers it started run them (started
    again here, detached, if they left meanwhile).
    """
    deadline = time.time() + 600
    while time.time() < deadline:
        running, queued = _queue_lines(project, "Running"), _queue_lines(project, "Queued")
        for name in running:
            kill = run([sys.executable, "-m", "dvc", "queue", "kill", "--force", name], project, check=False)
            if kill.returncode == 0:
                return name
        if not running and not queued:
            break
        if queued and not running:
            subprocess.run(
                [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"],
                cwd=project,
                env=env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        time.sleep(2)
    raise AssertionError("no trial was queued or running to be killed")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_pruned_sweep_through_the_queue_survives_a_kill_and_its_best_trial_becomes_a_round(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=700, test_size=200, seed=1)
    project = make_project(tmp_path / "p", (archive, md5), **TRIAL_SETTINGS)
    (project / "sweeps" / "s.yaml").write_text(yaml.safe_dump(TINY_SWEEP))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep file"], project)
    cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/s.yaml", "--workers", "2"]

    driver = subprocess.Popen(
        cmd, cwd=project, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 900
    # a trial finished and one queued or running: the study first (read in-process), then DVC's queue,
    # since each `dvc queue status` costs the trials a second of CPU
    while not (
        any(t.state.name == "COMPLETE" for t in _trials(project))
        and (_queue_lines(project, "Running") or _queue_lines(project, "Queued"))
    ):
        assert driver.poll() is None and time.time() < deadline
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver (DVC's queue workers have process groups of their own)
    driver.wait()
    killed = _kill_a_running_trial(project)  # and a worker's experiment, SIGKILLed through DVC
    out = run(cmd + ["--promote", "s-best"], project).stdout
    wait_for_queue_workers_to_exit(project)

    trials = _trials(project)
    retried = [t for t in trials if t.user_attrs.get("retried")]
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t not in retried]
    assert len(counted) == 6 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert [t.user_attrs.get("preset") for t in trials[:2]] == ["round-1", "round-2"]  # the known rounds first
    assert trials[1].params == {"train.learning_rate": 0.05, "train.batch_size": "96"}
    # the kill lands either before the experiment is saved (the trial is retried) or after (it is recorded)
    saved = run(["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps/"], project).stdout.split()
    names = [f"s-t{t.number:03d}" for t in retried]
    if killed in saved:
        assert killed not in names and (f"({killed}) complete" in out or f"({killed}) pruned" in out)
    else:
        assert killed in names and f"({killed}) failed; marked FAIL, retrying it" in out
    # the killed driver may have asked for a trial it had not queued yet (lost), and DVC's queue may orphan a
    # task (a worker that exits as it is handed one): those are retried too
    assert all(
        f"({name}) was lost; marked FAIL, retrying it" in out or f"({name}) orphaned; marked FAIL, retrying it" in out
        for name in names
        if name != killed
    )
    for t in retried:
        retry = t
        while retry.user_attrs.get("retried"):  # the last of the retries of the same values
            (retry,) = [u for u in trials if u.user_attrs.get("retry_of") == retry.number]
        assert retry.params == t.params and retry.state.name in ("COMPLETE", "PRUNED")

    finished = [t for t in counted if t.state.name in ("COMPLETE", "PRUNED")]
    pruned = [t for t in finished if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name, t.intermediate_values) for t in trials]
    shown = run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], project).stdout.split()
    for t in finished:
        name = f"s-t{t.number:03d}"
        assert name in shown  # a named DVC experiment
        epochs = len(t.intermediate_values)
        # the threshold rule, epoch by epoch after the warm-up: stopped at the first value below 0.11 (at the last
        # epoch too), and a trial that finished unpruned never fell below it
        after_warmup = [v for e, v in sorted(t.intermediate_values.items()) if e >= 2]
        if t in pruned:
            assert after_warmup[-1] < 0.11 and all(v >= 0.11 for v in after_warmup[:-1]), (t.number, after_warmup)
        else:
            assert epochs == 3 and all(v >= 0.11 for v in after_warmup), (t.number, after_warmup)
    for t in pruned:  # stopped as an early stop is: history and checkpoint kept, the summary says why
        rev = f"s-t{t.number:03d}"
        summary = json.loads(dvc.api.read("reports/train_summary.json", repo=str(project), rev=rev))
        history = dvc.api.read("reports/history.csv", repo=str(project), rev=rev).splitlines()
        assert summary["pruned"] and summary["stopped_epoch"] == len(history) - 1 == len(t.intermediate_values)

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    (parent,) = [r for r in client.search_runs([experiment], "tags.sweep = 's'") if "sweep.trial" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_report")} == {
        "sweep_report/sweep-s.md",
        "sweep_report/sweep-s.png",
    }
    runs = [r for r in client.search_runs([experiment], "tags.sweep = 's'") if r.info.run_id != parent.info.run_id]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    failed = {str(t.number) for t in trials if t.state.name == "FAIL"}
    assert {r.data.tags["sweep.trial_state"] for r in runs if r.data.tags["sweep.trial"] in failed} <= {"FAIL"}
    by_trial = {}
    for r in runs:
        if r.info.status == "FINISHED" and r.data.tags["sweep.trial"] not in failed:
            assert r.data.tags["sweep.trial"] not in by_trial  # no trial counted twice
            by_trial[r.data.tags["sweep.trial"]] = r
    assert sorted(by_trial) == sorted(str(t.number) for t in finished)
    for t in finished:  # each finished trial's run has the epochs its trial reported
        history = client.get_metric_history(by_trial[str(t.number)].info.run_id, "val_accuracy")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
    # the workers kept busy: the share of the time (from the first training's start) that two trainings ran
    share = share_running([(r.info.start_time, r.info.end_time) for r in runs], 2)
    print(f"sweep with 2 workers: two trainings running {share:.0%} of the time after the first started")
    assert share > 0.0
    assert {by_trial[str(t.number)].data.tags["sweep.trial_state"] for t in pruned} == {"PRUNED"}

    report = (project / "reports" / "sweep-s.md").read_text()
    assert (
        "## Parameter importances" in report
        and "saved by pruning" in report
        and "(`--workers 2`)" in report
        and "| round-2 | trial" in report
    )
    best = max((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: t.value)
    preset = yaml.safe_load((project / "rounds" / "s-best.yaml").read_text())
    assert preset["train"]["learning_rate"] == best.params["train.learning_rate"]
    assert preset["train"]["batch_size"] == int(best.params["train.batch_size"])
    # the searched values on the baseline: round-2's schedule, not the sweep's shortened one
    round_2 = yaml.safe_load((project / "rounds" / "round-2.yaml").read_text())["train"]
    assert preset["train"] == {
        **round_2,
        "learning_rate": preset["train"]["learning_rate"],
        "batch_size": preset["train"]["batch_size"],
    }

    # the promoted round runs (at 3 epochs, its milestones scaled)
    run([sys.executable, "-m", "cifar_rounds.analysis.rounds", "run", "s-best", "--epochs", "3"], project)
    metrics = read_json(project / "metrics.json")
    ran = client.get_run(metrics["mlflow_run_id"])
    assert (
        ran.data.tags["round"] == "s-best"
        and float(ran.data.params["train.learning_rate"]) == best.params["train.learning_rate"]
    )
