"""The search for round N+1: sweep files, the trial hook, the driver over DVC's queue, promotion, proposals."""

from __future__ import annotations

import json
import math
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

from conftest import REPO, env, make_project, read_json, repo_params, run
from cifar_rounds.nextround import proposals
from cifar_rounds.params import ParamsError, SweepParams, with_overrides
from cifar_rounds.replicates import Replicate, Round
from cifar_rounds.sweepfile import load_sweep
from cifar_rounds.synthetic import write_archive
from cifar_rounds.trial import NoTrial, StudyTrial, conclude, open_trial

GOOD = {
    "study": "r3", "baseline": "round-2", "trials": 4, "enqueue": ["round-1", "round-2"],
    "fixed": {"train.num_epochs": 30, "train.lr_milestones": [10, 20]},
    "space": {"train.learning_rate": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
              "train.batch_size": {"type": "categorical", "choices": [64, 96, 128]}},
}


def sweep_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **changes}))
    return path


def test_a_good_sweep_file_has_the_documented_defaults(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path), repo_params())
    assert (sweep.objective.metric, sweep.objective.direction) == ("val_accuracy", "maximize")
    assert (sweep.sampler.kind, sweep.pruner.kind) == ("tpe", "median")
    assert load_sweep(REPO / "sweeps/round-3.yaml", repo_params()).study == "round-3"  # the shipped example


@pytest.mark.parametrize("changes, message", [
    ({"space": {"train.learnig_rate": {"type": "float", "low": 0.01, "high": 0.1}}},
     "unknown parameter 'train.learnig_rate' (did you mean train.learning_rate?)"),
    ({"space": {"train.momentum": {"type": "float", "low": 0.5, "high": 1.5}}}, "space.train.momentum: 1.5 is not a valid value"),
    ({"space": {"train.learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}}, "needs low < high"),
    ({"space": {"train.learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "low > 0 on a log scale"),
    ({"objective": {"metric": "test_accuracy"}}, "objective.metric: Input should be 'val_accuracy' or 'val_loss'"),
    ({"objective": {"metric": "val_loss", "direction": "maximize"}}, "val_loss is to be minimized"),
    ({"sampler": {"kind": "grid"}}, "every space entry must be categorical"),
    ({"pruner": {"kind": "hyperband"}}, "pruner"),
    ({"fixed": {"train.num_epochs": 0}}, "fixed: "),
    ({"fixed": {"train.batch_size": 64}}, "train.batch_size is both fixed and searched"),
    ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
    ({"study": "bad name"}, "study: String should match pattern"),
    ({"extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_bad_sweep_files_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")) as error:
        load_sweep(sweep_file(tmp_path, **changes), repo_params())
    assert "\n" not in str(error.value) and str(tmp_path / "sweep.yaml") in str(error.value)


def test_the_cli_refuses_in_one_line_and_creates_nothing(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    for name in ("params.yaml", "rounds"):
        (project / name).symlink_to(REPO / name)
    cases = {
        "malformed": "study: [unclosed",
        "outside": yaml.safe_dump({**GOOD, "space": {"train.batch_size": {"type": "categorical", "choices": [64, 96]}}}),
        "storage": yaml.safe_dump({**GOOD, "storage": f"sqlite:///{tmp_path}/no/such/dir/optuna.db"}),
    }
    expected = {"malformed": "not valid YAML", "outside": "enqueue: preset round-1 has train.batch_size = 128, outside",
                "storage": "sweep storage: cannot open"}
    for name, text in cases.items():
        (project / f"{name}.yaml").write_text(text)
        result = run([sys.executable, "-m", "cifar_rounds.sweep", f"{name}.yaml"], project, check=False)
        assert result.returncode == 1 and expected[name] in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


def test_a_study_name_used_by_another_space_is_refused(tmp_path, monkeypatch):
    from cifar_rounds.cli import StageError
    from cifar_rounds.sweep import open_study

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/optuna.db"
    first = load_sweep(sweep_file(tmp_path), repo_params())
    study, _, created = open_study(first, url)
    assert created
    study.set_user_attr("space_digest", first.digest())
    assert open_study(first, url)[2] is False  # the same space continues
    wider = load_sweep(sweep_file(tmp_path, space={**GOOD["space"], "train.lr_gamma": {"type": "float", "low": 0.1, "high": 0.5}}),
                       repo_params())
    with pytest.raises(StageError, match="study 'r3' .* was created from another search space"):
        open_study(wider, url)


def test_a_run_without_a_sweep_imports_no_optuna():
    code = ("import sys; from cifar_rounds.trial import open_trial; from cifar_rounds.params import SweepParams; "
            "t = open_trial(SweepParams(study=None, trial=None, storage=None)); "
            "assert t.report(1, {'val_accuracy': 0.5}) is False and t.tags() == {}; print('optuna' in sys.modules)")
    assert run([sys.executable, "-c", code], REPO).stdout.strip() == "False"


def test_trials_are_concluded_from_saved_experiments_and_lost_only_when_gone_for_good(tmp_path, monkeypatch):
    """The queue's word is not the last: a saved experiment is a result, a briefly missing entry is not lost."""
    from cifar_rounds import sweep as driver

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run(["git", "init", "-q"], tmp_path)
    run(["git", "commit", "-q", "--allow-empty", "-m", "baseline"], tmp_path)
    d = driver.new_driver(load_sweep(sweep_file(tmp_path), repo_params()), repo_params())
    trials = [d.study.ask() for _ in range(3)]
    for t in trials:
        t.set_user_attr("queue", d.queue)
        t.report(0.5, 1)
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    run(["git", "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/r3-t000", head], tmp_path)  # saved, entry removed
    experiment = d.client.get_run(d.parent_run_id).info.experiment_id
    finished = d.client.create_run(experiment, tags={"sweep": "r3", "sweep.trial": "2"}).info.run_id
    d.client.set_terminated(finished, "FINISHED")  # trained, but its experiment failed before it was saved
    monkeypatch.setattr(driver, "queue_states", lambda names: {"r3-t002": "Failed"})
    d.inherited = {0, 1, 2}

    assert driver.settle(d) == [1]  # t001: missing from the queue for a moment only, still waited for
    states = [t.state.name for t in d.study.get_trials()]
    assert states[:3] == ["COMPLETE", "RUNNING", "FAIL"] and d.study.trials[0].value == 0.5
    assert d.client.get_run(finished).data.tags["sweep.trial_state"] == "FAIL"
    monkeypatch.setattr(driver, "LOST_AFTER_S", 0.0)
    assert driver.settle(d) == []
    retried = [t.user_attrs["retry_of"] for t in d.study.get_trials() if "retry_of" in t.user_attrs]
    assert d.study.trials[1].state.name == "FAIL" and sorted(retried) == [1, 2]


def _study_with_pruner(tmp_path, monkeypatch) -> tuple[optuna.Study, str]:
    from cifar_rounds.sweepfile import MedianPruner, Objective

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.set_user_attr("objective", Objective().model_dump())
    study.set_user_attr("pruner", MedianPruner(kind="median", startup_trials=2, warmup_epochs=2).model_dump())
    return study, url


def test_the_trial_hook_reports_prunes_by_the_studys_pruner_and_the_result_is_concluded(tmp_path, monkeypatch):
    study, url = _study_with_pruner(tmp_path, monkeypatch)
    for accuracies in ([0.5, 0.7, 0.6], [0.5, 0.65, 0.8]):  # two good trials complete
        number = study.ask().number
        trial = open_trial(SweepParams(study="s", trial=number, storage=url))
        assert isinstance(trial, StudyTrial)
        assert not any(trial.report(e, {"val_accuracy": a}) for e, a in enumerate(accuracies, 1))
        assert trial.finish([], pruned=False) == "COMPLETE"
        assert study.trials[number].state.name == "RUNNING"  # until the driver sees the experiment succeed
        assert conclude(study, number) == "COMPLETE"
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url))
    assert trial.report(1, {"val_accuracy": 0.1}) is False  # within the warm-up: never pruned
    assert trial.report(2, {"val_accuracy": 0.1}) is True  # far below the median at epoch 2
    assert trial.finish([], pruned=True) == "PRUNED" and conclude(study, number) == "PRUNED"
    silent = study.ask().number  # reported nothing (it died before its first epoch ended)
    assert conclude(study, silent) == "FAIL"
    states = [(t.state.name, t.value) for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [("COMPLETE", 0.7), ("COMPLETE", 0.8), ("PRUNED", 0.1), ("FAIL", None)]  # the best epoch's value
    # a finished trial is not reported to again (an applied experiment rerun later)
    assert isinstance(open_trial(SweepParams(study="s", trial=0, storage=url)), NoTrial)


def test_a_trial_of_a_missing_study_is_one_line(tmp_path, monkeypatch):
    from cifar_rounds.cli import StageError

    _, url = _study_with_pruner(tmp_path, monkeypatch)
    with pytest.raises(StageError, match="sweep: study 'nope' has no trial 3"):
        open_trial(SweepParams(study="nope", trial=3, storage=url))


def _replicate(train_acc=0.9, test_acc=0.85, stopped=100, noise=math.nan, lam=math.nan, bound=100.0) -> Replicate:
    params = with_overrides(repo_params(), {"train.num_epochs": 100, "train.lr_milestones": [30, 60, 80],
                                            "train.patience": 20, "train.batch_size": 96, "tracking.round": "round-2"})
    history = [{"epoch": e, "noise_scale": noise, "lambda_max": lam if e == stopped else math.nan,
                "stability_bound": bound, "val_loss": 1.0, "learning_rate": 0.05} for e in range(1, stopped + 1)]
    metrics = {"train_accuracy": train_acc, "test_accuracy": test_acc, "stopped_epoch": stopped}
    return Replicate("r", params, metrics, history, [])


def test_next_round_proposals_come_only_from_measurements_that_cross_their_lines():
    calm = Round("c", [_replicate()])
    assert proposals(calm) == []
    memorised = proposals(Round("m", [_replicate(train_acc=1.0, test_acc=0.8329)]))
    assert [p.slug for p in memorised] == ["regularisation"]
    assert "train accuracy 100.00% with a train-test gap of 16.71%" in memorised[0].evidence
    assert memorised[0].overrides == {"train.weight_decay": 0.001}
    early = proposals(Round("e", [_replicate(stopped=45)]))
    assert [p.slug for p in early] == ["patience"] and early[0].overrides == {"train.patience": 35}
    assert "epochs 45" in early[0].evidence and "milestone (80)" in early[0].evidence
    batch = proposals(Round("b", [_replicate(noise=1000.0)]))
    assert [p.slug for p in batch] == ["batch"] and batch[0].overrides["train.batch_size"] == 192
    assert proposals(Round("b", [_replicate(noise=300.0)])) == []  # 3.1x the batch: below the 4x line
    assert proposals(Round("e", [_replicate(stopped=85)])) == []  # after the last milestone (80)
    edge = proposals(Round("l", [_replicate(lam=90.0, bound=100.0)]))
    assert [p.slug for p in edge] == ["learning-rate"] and "90% of the stability bound" in edge[0].evidence
    assert proposals(Round("l", [_replicate(lam=50.0, bound=100.0)])) == []


def test_a_proposal_writes_a_sweep_file_that_validates(tmp_path, monkeypatch):
    from cifar_rounds.nextround import next_round_lines

    monkeypatch.chdir(REPO)  # the presets
    lines = next_round_lines(Round("round-2", [_replicate(train_acc=1.0, test_acc=0.8329)]), tmp_path / "next")
    assert any("more regularisation" in line and "python -m cifar_rounds.sweep" in line for line in lines)
    sweep = load_sweep(tmp_path / "next" / "regularisation.yaml", repo_params())
    assert sweep.baseline == "round-2" and list(sweep.space) == ["train.weight_decay"]


TRIAL_SETTINGS = {"data.val_size": 100, "diagnostics.sharpness": False, "diagnostics.noise_scale": False,
                  "tracking.log_model": False}
TINY_SWEEP = {
    "study": "s", "baseline": "round-2", "trials": 6, "enqueue": ["round-1", "round-2"],
    "fixed": {"train.num_epochs": 3, "train.lr_milestones": [2], "train.patience": 3},
    # log-uniform down to 1e-5: most random draws learn nothing in 3 epochs, and the pruner stops them
    "space": {"train.learning_rate": {"type": "float", "low": 0.00001, "high": 0.1, "log": True},
              "train.batch_size": {"type": "categorical", "choices": [64, 96, 128]}},
    "sampler": {"kind": "random", "seed": 3},
    "pruner": {"kind": "median", "startup_trials": 2, "warmup_epochs": 1},
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
    """SIGKILL one trial's running experiment (`dvc queue kill --force`); its name."""
    while names := _queue_lines(project, "Running"):
        for name in names:
            if run([sys.executable, "-m", "dvc", "queue", "kill", "--force", name], project, check=False).returncode == 0:
                return name
    raise AssertionError("the running trials ended before one could be killed")


def _wait_for_workers_to_exit(project: Path) -> None:
    """DVC's queue workers (started through the sweep) leave by themselves once the queue is empty."""
    deadline = time.time() + 120
    while "Worker status: 0 active, 0 idle" not in run([sys.executable, "-m", "dvc", "queue", "status"], project).stdout:
        assert time.time() < deadline
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_pruned_sweep_through_the_queue_survives_a_kill_and_its_best_trial_becomes_a_round(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=700, test_size=200, seed=1)
    project = make_project(tmp_path / "p", (archive, md5), **TRIAL_SETTINGS)
    (project / "sweeps" / "s.yaml").write_text(yaml.safe_dump(TINY_SWEEP))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep file"], project)
    cmd = [sys.executable, "-m", "cifar_rounds.sweep", "sweeps/s.yaml", "--workers", "2"]

    driver = subprocess.Popen(cmd, cwd=project, env=env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    # the study first (read in-process), then DVC's queue: each `dvc queue status` costs the trials a second of CPU
    while not (any(t.state.name == "COMPLETE" for t in _trials(project)) and _queue_lines(project, "Running")):
        assert driver.poll() is None and time.time() < deadline
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver (DVC's queue workers have process groups of their own)
    driver.wait()
    killed = _kill_a_running_trial(project)  # and a worker's experiment, SIGKILLed through DVC
    out = run(cmd + ["--promote", "s-best"], project).stdout
    _wait_for_workers_to_exit(project)

    trials = _trials(project)
    retried = [t for t in trials if t.user_attrs.get("retried")]
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t not in retried]
    assert len(counted) == 6 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert [t.user_attrs.get("preset") for t in trials[:2]] == ["round-1", "round-2"]  # the known rounds first
    assert trials[1].params == {"train.learning_rate": 0.05, "train.batch_size": "96"}
    # the kill lands either before the experiment is saved (the trial is retried) or after (it is recorded)
    saved = run(["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps/"], project).stdout.split()
    if killed in saved:
        assert not retried and (f"({killed}) complete" in out or f"({killed}) pruned" in out)
    else:
        assert [f"s-t{t.number:03d}" for t in retried] == [killed]
        assert f"({killed}) failed; marked FAIL, retrying it" in out
        (retry,) = [u for u in trials if u.user_attrs.get("retry_of") == retried[0].number]
        assert retry.params == retried[0].params and retry.state.name in ("COMPLETE", "PRUNED")

    finished = [t for t in counted if t.state.name in ("COMPLETE", "PRUNED")]
    pruned = [t for t in finished if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name, t.intermediate_values) for t in trials]
    shown = run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], project).stdout.split()
    for t in finished:
        name = f"s-t{t.number:03d}"
        assert name in shown  # a named DVC experiment
        epochs = len(t.intermediate_values)
        assert (epochs < 3) if t in pruned else (epochs == 3), (t.number, t.state.name, epochs)
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
        "sweep_report/sweep-s.md", "sweep_report/sweep-s.png"}
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
    assert {by_trial[str(t.number)].data.tags["sweep.trial_state"] for t in pruned} == {"PRUNED"}

    report = (project / "reports" / "sweep-s.md").read_text()
    assert "## Parameter importances" in report and "saved by pruning" in report and "| round-2 | trial" in report
    best = max((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: t.value)
    preset = yaml.safe_load((project / "rounds" / "s-best.yaml").read_text())
    assert preset["train"]["learning_rate"] == best.params["train.learning_rate"]
    assert preset["train"]["batch_size"] == int(best.params["train.batch_size"]) and preset["train"]["num_epochs"] == 3

    run([sys.executable, "-m", "cifar_rounds.rounds", "run", "s-best"], project)  # the promoted round runs as it stands
    metrics = read_json(project / "metrics.json")
    ran = client.get_run(metrics["mlflow_run_id"])
    assert ran.data.tags["round"] == "s-best" and float(ran.data.params["train.learning_rate"]) == best.params["train.learning_rate"]
