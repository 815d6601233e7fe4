"""A sweep's workers, end to end: a training, a worker and the sweep each SIGKILLed at two moments (a training before
and after its first epoch; a worker while its trial trains and while its experiment is pushed; the sweep while its
workers set up and while they train), the same command finishing it, trials pruned, the best promoted to a round."""

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
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import env, make_project, read_json, run

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
    # references are the trials trained so far: in which order the workers train them is not the test's to choose)
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


def _descendants(driver: subprocess.Popen, module: str) -> list[psutil.Process]:
    """The sweep's Python processes (its workers, their trainings) that run `module` (not the shell DVC starts)."""
    try:
        found = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in found if _cmdline(p)[1:3] == ["-m", module]]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _trial_of(process: psutil.Process) -> int:
    """The trial a training or a push runs for: the experiment's name (`-n s-t007`, or the push's last argument) on
    its command line or its parents'."""
    for p in [process, *process.parents()]:
        cmd = _cmdline(p)
        if cmd[1:5] == ["-m", "dvc", "exp", "run"]:
            return int(cmd[cmd.index("-n") + 1].rsplit("-t", 1)[1])
        if cmd[1:5] == ["-m", "dvc", "exp", "push"]:
            return int(cmd[-1].rsplit("-t", 1)[1])
    raise AssertionError(f"no experiment above {_cmdline(process)}")


def _worker_of(process: psutil.Process) -> psutil.Process:
    (worker,) = [p for p in process.parents() if _cmdline(p)[1:3] == ["-m", "cifar_rounds.search.worker"]]
    return worker


def _epochs(project: Path, number: int) -> int:
    return len(next(t for t in _trials(project) if t.number == number).intermediate_values)


def _find(what, driver: subprocess.Popen, deadline: float, poll_s: float = 0.3):
    """The first thing `what()` returns, polled until the deadline while the sweep runs."""
    while True:
        found = what()
        if found:
            return found
        assert driver.poll() is None and time.time() < deadline, "the sweep ended before the moment came"
        time.sleep(poll_s)


def _training(project: Path, driver: subprocess.Popen, trained_epochs: bool) -> psutil.Process | None:
    """A training of the sweep's whose trial has reported an epoch (or none yet)."""
    for training in _descendants(driver, "cifar_rounds.stages.train"):
        try:
            if (_epochs(project, _trial_of(training)) > 0) == trained_epochs:
                return training
        except (psutil.NoSuchProcess, StopIteration):  # ended, or its trial not yet in the study
            continue
    return None


def _pushing(driver: subprocess.Popen) -> psutil.Process | None:
    """A `dvc exp push` a worker runs: its trial has trained and its experiment is saved."""
    found = [
        p
        for p in psutil.Process(driver.pid).children(recursive=True)
        if _cmdline(p)[1:5] == ["-m", "dvc", "exp", "push"]
    ]
    return found[0] if found else None


def _kill_driver(driver: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL to the sweep alone; its workers and what they run, left to stop by themselves."""
    left = [p for w in _descendants(driver, "cifar_rounds.search.worker") for p in [w, *w.children(recursive=True)]]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    return left


def _start(cmd: list[str], project: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=project, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def kill_at_each_moment(project: Path, cmd: list[str]) -> tuple[dict[str, list[int]], list[psutil.Process]]:
    """Two sweeps of `cmd`, each SIGKILLed; between, a training, a worker and the sweep killed at two moments each.
    Returns the trials each kill stopped, by moment, and the processes left running."""
    kills, deadline = {}, time.time() + 1200
    # the sweep, while its workers set up their first trials (before any training)
    driver = _start(cmd, project)
    _find(lambda: any(t.state.name == "RUNNING" for t in _trials(project)), driver, deadline)
    kills["sweep, setting up"] = [t.number for t in _trials(project) if t.state.name == "RUNNING"]
    assert not _descendants(driver, "cifar_rounds.stages.train")
    psutil.wait_procs(_kill_driver(driver), timeout=300)  # the workers stop their trials once their sweep is gone

    driver = _start(cmd, project)
    # a training before its first epoch, then one after an epoch
    for moment, epochs in (("training, before its first epoch", False), ("training, after an epoch", True)):
        training = _find(lambda: _training(project, driver, epochs), driver, deadline)
        kills[moment] = [_trial_of(training)]
        training.kill()
    # a worker while its trial's experiment is pushed, then one while its trial trains (what each ran is left to end)
    left = []
    for moment, find in (
        ("worker, pushing", lambda: _pushing(driver)),
        ("worker, training", lambda: _training(project, driver, True)),
    ):
        running = _find(find, driver, deadline, 0.1)
        kills[moment], worker = [_trial_of(running)], _worker_of(running)
        left += worker.children(recursive=True)
        worker.kill()
    # the sweep, while a worker trains
    _find(lambda: _training(project, driver, True), driver, deadline)
    kills["sweep, training"] = [_trial_of(t) for t in _descendants(driver, "cifar_rounds.stages.train")]
    return kills, left + _kill_driver(driver)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_pruned_sweep_survives_kills_at_several_moments_and_its_best_trial_becomes_a_round(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=700, test_size=200, seed=1)
    project = make_project(tmp_path / "p", (archive, md5), **TRIAL_SETTINGS)
    (project / "sweeps" / "s.yaml").write_text(yaml.safe_dump(TINY_SWEEP))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep file"], project)
    # two ready workers: that path end to end (the outage test runs the default, none), and workers to spare for
    # the kills below
    cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/s.yaml", "--workers", "2", "--ready", "2"]
    kills, orphans = kill_at_each_moment(project, cmd)
    out = run(cmd + ["--promote", "s-best"], project).stdout
    psutil.wait_procs(orphans, timeout=300)  # a killed worker's training stops at its next epoch, or ends
    print("killed:", kills)

    trials = _trials(project)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    killed = [t for t in trials if t.state.name == "FAIL" and not t.user_attrs.get("surplus")]
    # the training, the worker and the sweep (its workers') stopped trials: failed, and their values tried again
    assert {t.number for t in killed} == retried, [(t.number, t.state.name) for t in trials]
    for moment, numbers in kills.items():  # every kill stopped its trials, whose values were tried again
        assert numbers and set(numbers) <= retried, (moment, numbers, retried)
    ran = {t.number: len(t.intermediate_values) for t in trials}
    assert ran[kills["training, before its first epoch"][0]] == 0 and ran[kills["training, after an epoch"][0]] >= 1
    (done,) = [line for line in out.splitlines() if line.startswith("sweep: done; ")]
    assert f"{len(retried)} retried" in done and " fail" not in done, out[-3000:]
    for t in killed:  # its values again, by Optuna's retry (itself killed, perhaps, and retried), to the end
        (retry,) = [u for u in trials if u.system_attrs.get("retry_history", [None])[-1] == t.number]
        assert retry.params == t.params and retry.state.name in ("COMPLETE", "PRUNED", "FAIL")
    assert [t.user_attrs.get("preset") for t in trials[:2]] == ["round-1", "round-2"]  # the known rounds first
    assert trials[1].params == {"train.learning_rate": 0.05, "train.batch_size": "96"}
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
    failed = {str(t.number) for t in killed}
    # a killed trial's run: ended KILLED or FAILED, or trained to its end by a killed worker's orphaned training;
    # tagged FAIL in every case
    assert {r.data.tags["sweep.trial_state"] for r in runs if r.data.tags["sweep.trial"] in failed} == {"FAIL"}
    assert {r.info.status for r in runs if r.data.tags["sweep.trial"] in failed} <= {"KILLED", "FAILED", "FINISHED"}
    by_trial = {}
    for r in runs:
        if r.info.status == "FINISHED" and r.data.tags["sweep.trial"] not in failed:
            assert r.data.tags["sweep.trial"] not in by_trial  # no trial counted twice
            by_trial[r.data.tags["sweep.trial"]] = r
    assert sorted(by_trial) == sorted(str(t.number) for t in finished)
    for t in finished:  # each finished trial's run has the epochs its trial reported
        history = client.get_metric_history(by_trial[str(t.number)].info.run_id, "val_accuracy")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
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
