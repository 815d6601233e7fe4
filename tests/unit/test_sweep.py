"""The search for round N+1: sweep files, the trial hook, the driver over DVC's queue, promotion, proposals."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from dvc.repo import Repo
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.proposals import next_round_lines, proposals
from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.rounds import load_preset, preset_names
from cifar_rounds.core.params import ParamsError, SweepParams, dump_params, with_overrides
from cifar_rounds.core.yamlio import write_yaml
from cifar_rounds.search.spec import load_sweep
from cifar_rounds.search.trial import NoTrial, StudyTrial, conclude, open_trial

from helpers import REPO, repo_params, run

GOOD = {
    "study": "r3",
    "baseline": "round-2",
    "trials": 4,
    "enqueue": ["round-1", "round-2"],
    "schedule": {"train.num_epochs": 30, "train.lr_milestones": [10, 20]},
    "space": {
        "train.learning_rate": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [64, 96, 128]},
    },
}


def sweep_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **changes}))
    return path


def test_a_good_sweep_file_has_the_documented_defaults(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path), repo_params(), load_preset)
    assert (sweep.objective.metric, sweep.objective.direction) == ("val_accuracy", "maximize")
    assert (sweep.sampler.kind, sweep.pruner.kind) == ("tpe", "median")
    assert (
        load_sweep(REPO / "sweeps/round-3.yaml", repo_params(), load_preset).study == "round-3"
    )  # the shipped example


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"space": {"train.learnig_rate": {"type": "float", "low": 0.01, "high": 0.1}}},
            "unknown parameter 'train.learnig_rate' (did you mean train.learning_rate?)",
        ),
        (
            {"space": {"train.momentum": {"type": "float", "low": 0.5, "high": 1.5}}},
            "space.train.momentum: 1.5 is not a valid value",
        ),
        ({"space": {"train.learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}}, "needs low < high"),
        (
            {"space": {"train.learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
            "low > 0 on a log scale",
        ),
        ({"objective": {"metric": "test_accuracy"}}, "objective.metric: Input should be 'val_accuracy' or 'val_loss'"),
        ({"objective": {"metric": "val_loss", "direction": "maximize"}}, "val_loss is to be minimized"),
        ({"sampler": {"kind": "grid"}}, "every space entry must be categorical"),
        ({"pruner": {"kind": "hyperband"}}, "pruner"),
        ({"pruner": {"kind": "threshold"}}, "pruner.threshold: a threshold pruner needs a lower or an upper limit"),
        ({"pruner": {"kind": "threshold", "lower": 0.5, "upper": 0.2}}, "lower (0.5) must be below upper (0.2)"),
        ({"fixed": {"train.num_epochs": 0}}, "fixed/schedule: "),
        ({"fixed": {"train.batch_size": 64}}, "train.batch_size is both in fixed and searched"),
        ({"schedule": {"train.batch_size": 64}}, "train.batch_size is both in schedule and searched"),
        ({"schedule": {"train.num_epochs": 0}}, "fixed/schedule: "),
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"study": "bad name"}, "study: String should match pattern"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_bad_sweep_files_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")) as error:
        load_sweep(sweep_file(tmp_path, **changes), repo_params(), load_preset)
    assert "\n" not in str(error.value) and str(tmp_path / "sweep.yaml") in str(error.value)


def _cli_project(tmp_path: Path) -> Path:
    """A folder the sweep CLI runs in: params.yaml (3 epochs, milestone 1), the presets and a short preset."""
    project = tmp_path / "p"
    shutil.copytree(REPO / "rounds", project / "rounds")
    write_yaml({"train": {"num_epochs": 4, "lr_milestones": [2]}}, project / "rounds" / "short.yaml")
    dump_params(
        with_overrides(repo_params(), {"train.num_epochs": 3, "train.lr_milestones": [1]}), project / "params.yaml"
    )
    return project


def in_process(main, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A command's `main` run here, in `cwd` with `args`: its exit code and output as its process would give them
    (parsing and refusals need no interpreter of their own)."""
    from cifar_rounds.core.errors import run_stage

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [main.__module__, *args])
        try:
            run_stage(main)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int | None) else 1
            if isinstance(stop.code, str):  # what the interpreter prints on the way out
                err.write(f"{stop.code}\n")
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def _sweep_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    from cifar_rounds.search.sweep import main

    return in_process(main, project, *args)


def test_the_cli_refuses_in_one_line_before_anything_runs_and_creates_nothing(tmp_path):
    project = _cli_project(tmp_path)
    short = {**GOOD, "baseline": "short", "enqueue": []}
    cases = {
        "malformed": ("study: [unclosed", [], "malformed.yaml: not valid YAML"),
        "outside": (
            yaml.safe_dump({**GOOD, "space": {"train.batch_size": {"type": "categorical", "choices": [64, 96]}}}),
            [],
            "enqueue: preset round-1 has train.batch_size = 128, outside",
        ),
        "storage": (
            yaml.safe_dump({**GOOD, "storage": f"sqlite:///{tmp_path}/no/such/dir/optuna.db"}),
            [],
            "sweep storage: cannot open",
        ),
        # valid on params.yaml (milestone 1), not on the baseline the trials start from (milestone 2)
        "fixed-on-baseline": (
            yaml.safe_dump({**short, "fixed": {"train.num_epochs": 2}}),
            [],
            "fixed-on-baseline.yaml: fixed/schedule: the values (on baseline short with the fixed values and the "
            "schedule) are not valid",
        ),
        "end-on-baseline": (
            yaml.safe_dump(
                {**short, "schedule": {}, "space": {"train.num_epochs": {"type": "int", "low": 2, "high": 9}}}
            ),
            [],
            "end-on-baseline.yaml: space.train.num_epochs: 2 is not a valid value on baseline short with the fixed",
        ),
        "folder": (None, [], "folder.yaml: a folder, not a sweep file"),
        "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", [], "binary.yaml: not a text file (not UTF-8)"),
        "empty": ("", [], "empty.yaml: empty, not a sweep file"),
        "promote-path": (yaml.safe_dump(GOOD), ["--promote", "../params"], "--promote '../params': not a preset name"),
        "promote-folder": (yaml.safe_dump(GOOD), ["--promote", "a/b"], "--promote 'a/b': not a preset name"),
        "promote-existing": (
            yaml.safe_dump(GOOD),
            ["--promote", "round-1"],
            "--promote round-1: rounds/round-1.yaml exists; choose another name, or add --force",
        ),
    }
    before = {p.name: p.read_bytes() for p in [project / "params.yaml", *(project / "rounds").iterdir()]}
    for name, (content, args, expected) in cases.items():
        path = project / f"{name}.yaml"
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        result = _sweep_cli(project, path.name, "--no-run", *args)
        assert result.returncode == 1 and expected in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()
    assert {p.name: p.read_bytes() for p in [project / "params.yaml", *(project / "rounds").iterdir()]} == before


def test_promote_without_a_complete_trial_is_one_line_and_ends_the_sweeps_run(tmp_path):
    project = _cli_project(tmp_path)
    (project / "s.yaml").write_text(yaml.safe_dump(GOOD))
    result = _sweep_cli(project, "s.yaml", "--no-run", "--promote", "r3-best")
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip() == "error: --promote: no trial of study 'r3' has completed (2 waiting); nothing promoted"
    )
    assert not (project / "rounds" / "r3-best.yaml").exists()
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("cifar-rounds").experiment_id], "tags.sweep = 'r3'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 0


def test_a_study_name_used_by_another_space_is_refused(tmp_path, monkeypatch):
    from cifar_rounds.core.errors import StageError
    from cifar_rounds.search.study import open_study

    first = load_sweep(sweep_file(tmp_path), repo_params(), load_preset)
    wider = load_sweep(
        sweep_file(tmp_path, space={**GOOD["space"], "train.lr_gamma": {"type": "float", "low": 0.1, "high": 0.5}}),
        repo_params(),
        load_preset,
    )
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/optuna.db"
    study, _, created = open_study(first, url, 60.0)
    assert created
    study.set_user_attr("space_digest", first.digest())
    assert open_study(first, url, 60.0)[2] is False  # the same space continues
    with pytest.raises(StageError, match="study 'r3' .* was created from another search space"):
        open_study(wider, url, 60.0)


def test_a_run_without_a_sweep_imports_no_optuna():
    code = (
        "import sys; from cifar_rounds.search.trial import open_trial; from "
        "cifar_rounds.core.params import SweepParams; "
        "t = open_trial(SweepParams(study=None, trial=None, storage=None), 60.0); "
        "assert t.report(1, {'val_accuracy': 0.5}) is False and t.tags() == {}; print('optuna' in sys.modules)"
    )
    assert run([sys.executable, "-c", code], REPO).stdout.strip() == "False"


def _git_driver(tmp_path: Path, monkeypatch, dvc: bool = True, **changes):
    """A driver of the sweep GOOD (with `changes`) in a git (and DVC) repository at tmp_path, with copies of the
    presets."""
    from cifar_rounds.search.study import new_driver

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    shutil.copytree(REPO / "rounds", tmp_path / "rounds")
    (tmp_path / "params.yaml").symlink_to(REPO / "params.yaml")
    run(["git", "init", "-q"], tmp_path)
    if dvc:
        Repo.init(str(tmp_path)).close()
    run(["git", "commit", "-q", "--allow-empty", "-m", "baseline"], tmp_path)
    return new_driver(load_sweep(sweep_file(tmp_path, **changes), repo_params(), load_preset), repo_params())


def test_trials_are_concluded_from_saved_experiments_and_lost_only_when_gone_for_good(tmp_path, monkeypatch):
    """The queue's word is not the last: a saved experiment is a result, a briefly missing entry is not lost."""
    from cifar_rounds.search import sweep as driver

    d = _git_driver(tmp_path, monkeypatch)
    trials = [d.study.ask() for _ in range(3)]
    for t in trials:
        t.set_user_attr("queue", d.queue)
        t.report(0.5, 1)
        t.set_user_attr("best_epoch", 1)  # as the train stage records it
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


def test_a_failing_queue_status_is_asked_again_then_stops_the_driver_leaving_the_trials_running(tmp_path, monkeypatch):
    """Read as an empty queue, a failed `dvc queue status` would have every running trial taken for lost."""
    from cifar_rounds.core.errors import StageError
    from cifar_rounds.search import queue as dvcq
    from cifar_rounds.search import sweep as driver

    d = _git_driver(tmp_path, monkeypatch, dvc=False)  # a git repository without DVC: `dvc queue status` fails
    t = d.study.ask()
    t.set_user_attr("queue", d.queue)
    experiment = d.client.get_run(d.parent_run_id).info.experiment_id
    training = d.client.create_run(experiment, tags={"sweep": "r3", "sweep.trial": str(t.number)}).info.run_id
    d.inherited = {t.number}
    monkeypatch.setattr(driver, "LOST_AFTER_S", 0.0)
    monkeypatch.setattr(dvcq, "QUEUE_STATUS_PAUSE_S", 0.0)
    asked = []
    real_run = subprocess.run
    monkeypatch.setattr(dvcq.subprocess, "run", lambda cmd, **kw: asked.append(cmd) or real_run(cmd, **kw))

    with pytest.raises(StageError) as error:
        driver.settle(d)
    assert re.match(r"sweep: `dvc queue status` failed 3 times \(exit \d+: ERROR: you are not inside", str(error.value))
    assert "\n" not in str(error.value)
    assert [cmd[-2:] for cmd in asked] == [["queue", "status"]] * 3
    assert d.study.trials[t.number].state.name == "RUNNING"
    assert (
        d.client.get_run(training).info.status == "RUNNING"
        and "sweep.trial_state" not in d.client.get_run(training).data.tags
    )


QUEUE_STATUS = """Task     Name      Created    Status
1a2b3c4  r3-t000   10:01 AM   Running
5d6e7f8  r3-t001   Jan 02, 2025   Success
9a8b7c6            10:02 AM   Queued

Worker status: 1 active, 0 idle
"""


def test_the_queue_status_table_is_read_and_anything_else_is_not():
    from cifar_rounds.search.queue import parse_queue_status

    states = parse_queue_status(QUEUE_STATUS)
    assert states["r3-t000"] == "Running" and states["r3-t001"] == "Success" and len(states) == 3
    assert parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n") == {}
    for garbled in ("", "ERROR: unexpected error\n", QUEUE_STATUS.split("Worker")[0], "Task Name\nWorker status: 0\n"):
        assert parse_queue_status(garbled) is None, garbled


def test_a_task_left_running_by_a_worker_that_exited_is_orphaned_then_lost_and_retried(tmp_path, monkeypatch):
    """DVC's queue can hand a task to a worker that is shutting down: Running forever, with no worker active."""
    from cifar_rounds.search import queue as dvcq
    from cifar_rounds.search import sweep as driver

    d = _git_driver(tmp_path, monkeypatch)
    t = d.study.ask()
    t.set_user_attr("queue", d.queue)
    table = QUEUE_STATUS.replace("1 active", "0 active")
    monkeypatch.setattr(
        dvcq.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, table if "queue" in cmd else "", ""),
    )
    assert dvcq.queue_states({"r3-t000"}) == {"r3-t000": dvcq.ORPHANED}
    assert driver.settle(d) == [t.number]  # a worker may be starting: waited for LOST_AFTER_S first
    monkeypatch.setattr(driver, "LOST_AFTER_S", 0.0)
    assert driver.settle(d) == []
    (retry,) = [u for u in d.study.get_trials() if u.user_attrs.get("retry_of") == t.number]
    assert d.study.trials[t.number].state.name == "FAIL" and retry.params == d.study.trials[t.number].params
    monkeypatch.setattr(dvcq.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, QUEUE_STATUS, ""))
    assert dvcq.queue_states({"r3-t000"}) == {"r3-t000": "Running"}  # with a worker active it is running


def test_a_sweep_trial_never_takes_another_runs_checkpoint_for_its_own(tmp_path):
    """A finished workspace run with the trial's very model and train params is not this trial's run."""
    from cifar_rounds.training.checkpoint import find_resume, run_identity, save_atomic

    workspace = repo_params()
    trial = with_overrides(workspace, {"sweep.study": "r3", "sweep.trial": 0, "tracking.round": "r3-t000"})
    last = tmp_path / "last.pt"
    save_atomic(
        {"params_digest": run_identity(workspace, "split"), "progress": {"run_id": "ws", "finished": True}}, last
    )
    assert find_resume(last, run_identity(workspace, "split")).state is not None  # the workspace run continues
    resume = find_resume(last, run_identity(trial, "split"))
    assert resume.state is None and resume.superseded_run == "ws"
    # the next trial does not take this trial's either, nor another round's run; the rest of tracking may
    # change between a kill and a resume
    assert run_identity(trial, "s") != run_identity(with_overrides(trial, {"sweep.trial": 1}), "s")
    assert run_identity(trial, "s") != run_identity(with_overrides(trial, {"tracking.round": "x"}), "s")
    assert run_identity(trial, "s") == run_identity(with_overrides(trial, {"tracking.grad_norm_interval": 7}), "s")


def test_promote_puts_the_searched_values_on_the_baseline_and_keeps_what_it_replaces(tmp_path, monkeypatch, capsys):
    from cifar_rounds.core.errors import StageError
    from cifar_rounds.search.promote import preset_target, promote

    d = _git_driver(tmp_path, monkeypatch)  # schedule: 30 epochs, milestones [10, 20]; round-2 has 250
    rounds = tmp_path / "rounds"
    t = d.study.ask()
    d.trial_values(t)
    d.study.tell(t, 0.61)
    searched = d.sweep.decoded(t.params)

    path = promote(d, "r3-best", force=False, folder=rounds)
    preset = load_preset("r3-best", rounds)
    assert preset == {**load_preset("round-2", rounds), **searched} and preset["train.num_epochs"] == 250
    header = path.read_text().split("\ntrain:")[0]
    assert f"trial {t.number}, val_accuracy 0.6100" in header
    (from_sweep,) = [line for line in header.splitlines() if line.startswith("# From the sweep: ")]
    assert sorted(from_sweep.removeprefix("# From the sweep: ").rstrip(".").split(", ")) == sorted(
        f"{k}={v!r}" for k, v in searched.items()
    )
    assert "not kept, the trials' shortened schedule: train.lr_milestones=[10, 20], train.num_epochs=30." in header

    for name, message in [
        ("../params", "not a preset name"),
        ("sub/r3", "not a preset name"),
        (".hidden", "not a preset name"),
        ("r3-best", "rounds/r3-best.yaml exists; choose another name, or add --force"),
    ]:
        with pytest.raises(StageError, match=message.replace("(", r"\(")):
            preset_target(name, force=False, folder=Path("rounds"))
    (rounds / "elsewhere.yaml").symlink_to(tmp_path / "params.yaml")
    with pytest.raises(StageError, match="rounds/elsewhere.yaml leads outside rounds/"):
        preset_target("elsewhere", force=True, folder=Path("rounds"))

    old = (rounds / "round-1.yaml").read_text()
    capsys.readouterr()
    promote(d, "round-1", force=True, folder=Path("rounds"))
    (backup,) = [p for p in rounds.iterdir() if p.name.startswith("round-1.yaml.") and p.name.endswith(".bak")]
    assert backup.read_text() == old and f"the previous round-1.yaml is kept as {backup.relative_to(tmp_path)}" in (
        capsys.readouterr().out
    )
    assert load_preset("round-1", Path("rounds")) == preset
    assert preset_names(rounds) == ["elsewhere", "r3-best", "round-1", "round-2"]  # a backup is no preset


def test_promote_keeps_the_rounds_own_fixed_values_and_changes_only_the_searched_ones(tmp_path, monkeypatch):
    """A proposal's sweep file fixes the values its round ran with: the promoted round is that round with the
    best searched values, never the preset's values that no trial ran."""
    from cifar_rounds.search.promote import promote

    own = {"train.weight_decay": 0.001, "model.width": 32, "train.num_epochs": 300, "train.lr_milestones": [150]}
    d = _git_driver(tmp_path, monkeypatch, fixed=own)  # and GOOD's shortened schedule: 30 epochs
    t = d.study.ask()
    trial = d.trial_values(t)
    assert (trial["train.num_epochs"], trial["model.width"]) == (30, 32)  # the trials: schedule over fixed
    d.study.tell(t, 0.61)
    promote(d, "r3-own", force=False, folder=tmp_path / "rounds")
    preset = load_preset("r3-own", tmp_path / "rounds")
    assert preset == {**load_preset("round-2", tmp_path / "rounds"), **own, **d.sweep.decoded(t.params)}


def _study_with_pruner(tmp_path, monkeypatch) -> tuple[optuna.Study, str]:
    from cifar_rounds.search.spec import MedianPruner, Objective

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.set_user_attr("objective", Objective().model_dump())
    study.set_user_attr("pruner", MedianPruner(kind="median", startup_trials=2, warmup_epochs=2).model_dump())
    return study, url


def test_the_trial_hook_reports_prunes_by_the_studys_pruner_and_the_result_is_concluded(tmp_path, monkeypatch):
    study, url = _study_with_pruner(tmp_path, monkeypatch)
    # two good trials complete; train.monitor (val_loss) chose epoch 3 in both: their checkpoints are evaluated
    for accuracies in ([0.5, 0.7, 0.6], [0.5, 0.65, 0.8]):
        number = study.ask().number
        trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
        assert isinstance(trial, StudyTrial)
        assert not any(trial.report(e, {"val_accuracy": a}) for e, a in enumerate(accuracies, 1))
        assert trial.finish(pruned=False, best_epoch=3) == "COMPLETE"
        assert study.trials[number].state.name == "RUNNING"  # until the driver sees the experiment succeed
        assert conclude(study, number) == "COMPLETE"
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
    assert trial.report(1, {"val_accuracy": 0.1}) is False  # within the warm-up: never pruned
    assert trial.report(2, {"val_accuracy": 0.1}) is True  # far below the median at epoch 2
    assert trial.finish(pruned=True, best_epoch=1) == "PRUNED" and conclude(study, number) == "PRUNED"
    silent = study.ask().number  # reported nothing (it died before its first epoch ended)
    assert conclude(study, silent) == "FAIL"
    states = [(t.state.name, t.value) for t in optuna.load_study(study_name="s", storage=url).trials]
    # the value at the monitor's best epoch (0.6), not the best of all epochs (0.7)
    assert states == [("COMPLETE", 0.6), ("COMPLETE", 0.8), ("PRUNED", 0.1), ("FAIL", None)]
    # a finished trial is not reported to again (an applied experiment rerun later)
    assert isinstance(open_trial(SweepParams(study="s", trial=0, storage=url), 60.0), NoTrial)


def test_a_trial_of_a_missing_study_is_one_line(tmp_path, monkeypatch):
    from cifar_rounds.core.errors import StageError

    _, url = _study_with_pruner(tmp_path, monkeypatch)
    with pytest.raises(StageError, match="sweep: study 'nope' has no trial 3"):
        open_trial(SweepParams(study="nope", trial=3, storage=url), 60.0)


def _replicate(
    train_acc=0.9, gap=0.05, test_acc=0.85, stopped=100, noise=math.nan, lam=math.nan, bound=100.0, **overrides
) -> Replicate:
    """A replicate of round-2 (100 epochs, milestones 30/60/80, patience 20) with a history that says what it is."""
    params = with_overrides(
        repo_params(),
        {
            "train.num_epochs": 100,
            "train.lr_milestones": [30, 60, 80],
            "train.patience": 20,
            "train.batch_size": 96,
            "tracking.round": "round-2",
            "tracking.preset": "round-2",
            **overrides,
        },
    )
    history = [
        {
            "epoch": e,
            "train_accuracy": train_acc,
            "train_val_accuracy_gap": gap,
            "noise_scale": noise,
            "lambda_max": lam if e == stopped else math.nan,
            "stability_bound": bound,
            "val_loss": 1.0,
            "learning_rate": 0.05,
        }
        for e in range(1, stopped + 1)
    ]
    metrics = {"train_accuracy": train_acc, "test_accuracy": test_acc, "stopped_epoch": stopped, "best_epoch": stopped}
    return Replicate("r", params, metrics, history, [])


WORKSPACE = repo_params().report  # the thresholds the report reads


def test_next_round_proposals_come_only_from_measurements_that_cross_their_lines():
    calm = Round("c", [_replicate()])
    assert proposals(calm, WORKSPACE) == []
    memorised = proposals(Round("m", [_replicate(train_acc=1.0, gap=0.1671)]), WORKSPACE)
    assert [p.slug for p in memorised] == ["regularisation"]
    assert "train accuracy 100.00% with a train-validation gap of 16.71%" in memorised[0].evidence
    assert memorised[0].overrides == {"train.weight_decay": 0.001}
    early = proposals(Round("e", [_replicate(stopped=45)]), WORKSPACE)
    assert [p.slug for p in early] == ["patience"] and early[0].overrides == {"train.patience": 35}
    assert "epochs 45" in early[0].evidence and "milestone (80)" in early[0].evidence
    batch = proposals(Round("b", [_replicate(noise=1000.0)]), WORKSPACE)
    assert [p.slug for p in batch] == ["batch"] and batch[0].overrides["train.batch_size"] == 192
    assert proposals(Round("b", [_replicate(noise=300.0)]), WORKSPACE) == []  # 3.1x the batch: below the 4x line
    assert proposals(Round("e", [_replicate(stopped=85)]), WORKSPACE) == []  # after the last milestone (80)
    edge = proposals(Round("l", [_replicate(lam=90.0, bound=100.0)]), WORKSPACE)
    assert [p.slug for p in edge] == ["learning-rate"] and "90% of the stability bound" in edge[0].evidence
    assert proposals(Round("l", [_replicate(lam=50.0, bound=100.0)]), WORKSPACE) == []


def test_memorisation_reads_the_workspaces_gap_criterion_and_no_proposal_says_what_each_rule_read(tmp_path):
    lax_round = _replicate(train_acc=1.0, gap=0.1, **{"report.max_train_test_gap": 0.5})
    assert [p.slug for p in proposals(Round("m", [lax_round]), WORKSPACE)] == ["regularisation"]  # 0.1 >= 0.08
    lax = with_overrides(repo_params(), {"report.max_train_test_gap": 0.5}).report
    assert proposals(Round("m", [_replicate(train_acc=1.0, gap=0.1)]), lax) == []
    calm = Round("c", [_replicate(noise=200.0), _replicate(noise=300.0)])
    lines = "\n".join(next_round_lines(calm, WORKSPACE, tmp_path / "next"))
    assert "No proposal: no measurement crossed its line" in lines
    assert "B_simple at the last epoch: 250 (seeds 200 to 300) against the batch 96 (line: 4x the batch, 384)" in lines
    assert not (tmp_path / "next").exists()


def test_memorisation_is_read_from_the_train_validation_gap_never_the_test_set():
    # a large train-test gap with a small train-validation gap proposes nothing: the test set decides no proposal
    assert proposals(Round("m", [_replicate(train_acc=1.0, gap=0.02, test_acc=0.80)]), WORKSPACE) == []
    # the gap at the best epoch (the evaluated checkpoint), not at the last
    rep = _replicate(train_acc=1.0, gap=0.02, test_acc=0.99)
    rep.history[49]["train_val_accuracy_gap"] = 0.2
    rep.metrics["best_epoch"] = 50
    assert [p.slug for p in proposals(Round("m", [rep]), WORKSPACE)] == ["regularisation"]


def test_a_longer_patience_and_a_weight_decay_from_zero():
    long = proposals(Round("e", [_replicate(stopped=45, **{"train.patience": 80})]), WORKSPACE)
    assert long[0].overrides == {"train.patience": 85}  # never shorter than the patience the round had
    assert long[0].space["train.patience"]["low"] == 80
    none = proposals(Round("m", [_replicate(train_acc=1.0, gap=0.2, **{"train.weight_decay": 0.0})]), WORKSPACE)
    assert none[0].overrides == {"train.weight_decay": 5e-4}
    assert none[0].space["train.weight_decay"] == {"type": "float", "low": 0.0, "high": 2e-3, "log": False}


def every_proposal(**overrides) -> Replicate:
    """A replicate that crosses every proposal's line: memorised, stopped early, small batch, sharp."""
    return _replicate(train_acc=1.0, gap=0.2, stopped=45, noise=1000.0, lam=90.0, bound=100.0, **overrides)


# rounds whose sweep files were refused: a comma-list name, values overridden away from the preset (weight decay
# 0: a log range [0, 0]; a learning rate below the preset's), and a patience longer than the milestones' gaps
ODD_ROUNDS = {
    "round-2-s0,round-2-s1": {"train.weight_decay": 0.0, "train.patience": 80},
    "round-2": {"train.weight_decay": 0.002, "train.learning_rate": 0.01, "train.momentum": 0.8},
}


@pytest.mark.parametrize("name", ODD_ROUNDS)
def test_proposed_sweep_files_load_and_cover_the_round_and_its_preset(tmp_path, monkeypatch, name):
    from cifar_rounds.analysis.rounds import load_preset
    from cifar_rounds.search.spec import check_enqueued

    monkeypatch.chdir(REPO)  # the presets
    rep = every_proposal(**ODD_ROUNDS[name])
    lines = next_round_lines(Round(name, [rep, rep]), WORKSPACE, tmp_path / "next")
    files = sorted((tmp_path / "next").glob("*.yaml"))
    assert [f.stem for f in files] == ["batch", "learning-rate", "patience", "regularisation"]
    assert all(f"python -m cifar_rounds.search.sweep {f}" in "".join(lines) for f in files)
    ran = rep.params.flat()
    for path in files:
        sweep = load_sweep(path, repo_params(), load_preset)
        check_enqueued(sweep, {p: load_preset(p) for p in sweep.enqueue + [sweep.baseline]}, path)
        assert sweep.baseline == "round-2" and sweep.study.endswith(path.stem)
        for key, dimension in sweep.space.items():
            assert dimension.contains(ran[key]), (path.stem, key)
        # the trials are the round's configuration: every value it ran with, the searched ones aside
        trial = with_overrides(repo_params(), {**load_preset("round-2"), **sweep.fixed}).flat()

        def configuration(values: dict) -> dict:
            return {
                k: v
                for k, v in values.items()
                if k.split(".")[0] in ("data", "model", "train") and k not in sweep.space and k != "train.seed"
            }

        assert configuration(trial) == configuration(ran), path.stem
    patience = yaml.safe_load((tmp_path / "next" / "patience.yaml").read_text())["space"]["train.patience"]
    assert patience["low"] <= ran["train.patience"] <= patience["high"]


def test_the_proposed_sweeps_trial_budget_is_the_reports_option_a_positive_whole_number(tmp_path, monkeypatch):
    from cifar_rounds.analysis.proposals import SWEEP_TRIALS, next_round_lines, trial_budget
    from cifar_rounds.core.errors import StageError

    monkeypatch.chdir(REPO)  # the presets
    rep = every_proposal()
    for trials, folder in ((SWEEP_TRIALS, tmp_path / "default"), (2, tmp_path / "two")):
        next_round_lines(Round("round-2", [rep, rep]), WORKSPACE, folder, trials)
        files = sorted(folder.glob("*.yaml"))
        assert len(files) == 4 and all(load_sweep(f, repo_params(), load_preset).trials == trials for f in files)
    refusal = "error: --sweep-trials {!r}: expected a positive whole number of trials per proposed sweep\n"
    for text in ("0", "2.5", ""):
        with pytest.raises(StageError) as refused:
            trial_budget(text)
        assert f"error: {refused.value}\n" == refusal.format(text)
    from cifar_rounds.analysis.report import main

    for text in ("-3", "twelve"):  # from the command line: one line, before anything is read
        result = in_process(main, tmp_path, "a", "b", "--sweep-trials", text)
        assert result.returncode == 1 and result.stderr == refusal.format(text), result.stderr


def test_queueing_waits_out_a_held_git_index_and_removes_one_a_killed_process_left(tmp_path, monkeypatch):
    from cifar_rounds.core.errors import StageError
    from cifar_rounds.search import queue as dvcq

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(dvcq, "QUEUE_PAUSE_S", 0.0)
    lock = tmp_path / ".git" / "index.lock"
    lock.parent.mkdir()
    lock.touch()
    answers = []

    def dvc(cmd, **kwargs):  # git's index stays locked while the lock file is there
        answers.append(lock.exists())
        locked = "ERROR: unexpected error - the index is locked; this might be due to a concurrent process\n"
        return subprocess.CompletedProcess(cmd, 255 if lock.exists() else 0, "", locked if lock.exists() else "")

    monkeypatch.setattr(dvcq.subprocess, "run", dvc)
    # a fresh lock is another process's: waited for, never removed, and in the end one line
    with pytest.raises(StageError, match="dvc exp run --queue failed for s-t004: ERROR: unexpected error - the index"):
        dvcq.queue_experiment("s-t004", {})
    assert answers == [True] * dvcq.QUEUE_TRIES and lock.exists()
    os.utime(lock, (time.time() - 60, time.time() - 60))  # left by a killed process
    answers.clear()
    dvcq.queue_experiment("s-t004", {})
    assert answers == [True, False] and not lock.exists()


def test_the_busy_share_counts_the_time_k_spans_overlap():
    from cifar_rounds.search.report import most_running, share_running

    assert share_running([(0, 10), (0, 10)], 2) == 1.0
    assert share_running([(0, 10), (5, 20), (10, 20)], 2) == 0.75  # 5 to 10 and 10 to 20, of 20
    assert share_running([(0, 5), (5, 10)], 2) == 0.0  # one after the other: a handover is no overlap
    assert share_running([(0, 5), (5, 10)], 1) == 1.0
    assert share_running([(0, 10), (2, 8), (4, 6), (20, 30)], 3) == 2 / 30
    assert share_running([], 2) is None and share_running([(3, 3)], 1) is None
    assert most_running([(0, 10), (2, 8), (4, 6), (20, 30)]) == 3 and most_running([(0, 5), (5, 10)]) == 1


def test_the_sweep_report_states_the_share_of_time_its_workers_trained(tmp_path, monkeypatch):
    from cifar_rounds.search.report import write_sweep_report

    d = _git_driver(tmp_path, monkeypatch)
    experiment = d.client.get_run(d.parent_run_id).info.experiment_id
    t0 = 1_700_000_000_000
    # two workers: trials 0 and 1 from 0 to 60 s, trial 2 from 70 to 130 s, trial 3 from 60 to 120 s
    for trial, (start, end, status) in enumerate(
        [(0, 60, "FINISHED"), (0, 60, "FINISHED"), (70, 130, "FINISHED"), (60, 120, "FINISHED"), (0, 130, "KILLED")]
    ):
        tags = {"sweep": "r3", "sweep.trial": str(trial)}
        run_id = d.client.create_run(experiment, start_time=t0 + start * 1000, tags=tags).info.run_id
        d.client.set_terminated(run_id, status, end_time=t0 + end * 1000)  # a KILLED run: not a training's end
    other = d.client.create_run(experiment, start_time=t0, tags={"sweep": "other", "sweep.trial": "0"}).info.run_id
    d.client.set_terminated(other, "FINISHED", end_time=t0 + 130_000)

    text = write_sweep_report(d, 2, tmp_path / "reports").read_text()
    # two ran from 0 to 60 s and from 70 to 120 s: 110 s of the 130 s
    assert "2 trainings ran 85% of the 2.2 min from the first training's start to the last one's end" in text
    assert "(`--workers 2`); at most 2 at once (4 finished trainings)." in text
    unknown = write_sweep_report(d, None, tmp_path / "reports").read_text()
    assert "2 or more trainings ran 85% of the 2.2 min" in unknown


def test_the_driver_keeps_each_workers_next_trial_queued_and_starts_workers_only_when_needed(monkeypatch):
    """Workers ending together each find their next trial; `dvc queue start` (a DVC process) is not run each poll."""
    from types import SimpleNamespace

    from cifar_rounds.search import sweep as driver

    queue, budget, seen = [], iter(range(10)), []  # the trials queued or running; when workers were started
    polled = []

    def queue_next(d):
        number = next(budget, None)
        if number is not None:
            queue.append(number)
        return number is not None

    def settle(d):
        if polled and queue:
            polled.pop()
            queue.pop(0)  # a trial ends at every poll
        return list(queue)

    d = SimpleNamespace(study=SimpleNamespace(get_trials=lambda deepcopy: []), ours=lambda t: True)
    monkeypatch.setattr(driver, "queue_next", queue_next)
    monkeypatch.setattr(driver, "settle", settle)
    monkeypatch.setattr(driver, "start_workers", lambda workers: seen.append(len(queue)))
    monkeypatch.setattr(driver, "stop_idle_workers", lambda: seen.append("stop"))
    monkeypatch.setattr(driver, "counts", lambda study: {})
    monkeypatch.setattr(driver.time, "sleep", lambda s: polled.append(s))
    polls = iter(range(0, 10_000, 5))
    monkeypatch.setattr(driver.time, "monotonic", lambda: next(polls))
    driver.drive(d, workers=2, poll_s=5)
    # 2 training, 2 ready and 1 queued; the workers started as each trial was queued, not at each poll; and
    # sent away at the end
    assert seen == [5] * 6 + ["stop"]


def test_the_workers_are_stopped_at_the_end_only_when_nothing_else_is_queued_or_running(tmp_path, monkeypatch):
    """A worker whose monitor died idles for good: the driver stops the workers once the queue is done."""
    from cifar_rounds.search import queue as dvcq

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (tmp_path / dvcq.WORKERS_LOG).parent.mkdir(parents=True)
    asked, table = [], ""
    monkeypatch.setattr(
        dvcq.subprocess,
        "run",
        lambda cmd, **kw: asked.append(cmd[3:]) or subprocess.CompletedProcess(cmd, 0, table, ""),
    )
    busy = QUEUE_STATUS
    done = QUEUE_STATUS.replace("Running", "Success").replace("Queued", "Failed")
    for table, stopped in (
        (busy, False),
        (QUEUE_STATUS.replace("Queued", "Success"), False),
        (done, True),
        ("", False),
    ):
        asked.clear()
        assert dvcq.stop_idle_workers() is stopped
        assert asked == [["queue", "status"]] + ([["queue", "stop"]] if stopped else [])


def test_a_task_whose_process_runs_is_not_orphaned_when_its_worker_shuts_down(tmp_path, monkeypatch):
    """A worker whose monitor asked while it was busy shuts down after its task, answering no inspection: the
    queue shows 0 active workers while the task's own process still trains it."""
    from dvc_task.proc.process import ProcessInfo

    from cifar_rounds.search import queue as dvcq

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run(["git", "init", "-q"], tmp_path)
    with Repo.init(str(tmp_path)) as repo:
        processes = repo.experiments.celery_queue.proc  # where DVC's queue records its tasks' processes
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    table = QUEUE_STATUS.replace("1 active", "0 active")
    monkeypatch.setattr(dvcq.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, table, ""))
    rev = "1a2b3c4d5e" + "0" * 30
    (Path(processes.wdir) / rev).mkdir(parents=True)
    for pid, returncode, state in (
        (os.getpid(), None, "Running"),  # alive, not ended: running
        (os.getpid(), 0, dvcq.ORPHANED),  # ended
        (int(ended.stdout), None, dvcq.ORPHANED),  # gone without recording its end
    ):
        processes[rev] = ProcessInfo(pid, None, None, None, returncode)
        assert dvcq.queue_states({"r3-t000"}) == {"r3-t000": state}, (pid, returncode)


def test_a_trial_ended_by_the_driver_while_it_trains_stops_in_one_line(tmp_path, monkeypatch):
    from cifar_rounds.core.errors import StageError

    study, url = _study_with_pruner(tmp_path, monkeypatch)
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
    assert trial.report(1, {"val_accuracy": 0.5}) is False
    study.tell(number, state=optuna.trial.TrialState.FAIL)  # the driver took it for lost
    with pytest.raises(StageError, match=rf"^sweep: trial {number} of 's' was ended \(FAIL\) while this run trained"):
        trial.report(2, {"val_accuracy": 0.6})


def test_the_queue_runs_as_many_workers_ready_as_training_and_caps_the_projects_trainings(tmp_path, monkeypatch):
    from cifar_rounds.search import queue as dvcq
    from cifar_rounds.training.lease import TRAININGS_ENV

    started = []
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(dvcq.subprocess, "run", lambda cmd, **kw: started.append((cmd, kw)))
    dvcq.start_workers(3)
    ((cmd, kw),) = started
    assert cmd[-4:] == ["queue", "start", "-j", "6"] and kw["env"][TRAININGS_ENV] == "3"
    assert kw["start_new_session"] and (tmp_path / dvcq.WORKERS_LOG).exists()  # detached, its output logged


def test_trials_whose_training_ended_are_the_pruners_references_before_the_driver_concludes_them(tmp_path, monkeypatch):
    # the driver concludes a trial after its evaluation and DVC's bookkeeping, or not at all while it is stopped;
    # the trials training meanwhile are judged against those that trained to their end
    study, url = _study_with_pruner(tmp_path, monkeypatch)
    for accuracies in ([0.5, 0.7, 0.6], [0.5, 0.65, 0.8]):
        number = study.ask().number
        trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
        assert not any(trial.report(e, {"val_accuracy": a}) for e, a in enumerate(accuracies, 1))
        trial.finish(pruned=False, best_epoch=3)
    stopped = study.ask().number  # pruned, not concluded: no reference
    trial = open_trial(SweepParams(study="s", trial=stopped, storage=url), 60.0)
    trial.report(1, {"val_accuracy": 0.1})
    trial.finish(pruned=True, best_epoch=1)
    assert [t.state.name for t in study.trials] == ["RUNNING"] * 3
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
    assert trial.report(1, {"val_accuracy": 0.1}) is False  # within the warm-up
    assert trial.report(2, {"val_accuracy": 0.68}) is False  # above the median of the two trained trials (0.675)
    assert trial.report(3, {"val_accuracy": 0.5}) is True  # its best (0.68) below their median (0.7): pruned
    # while one trial has trained, the pruner still waits for its startup trials
    (tmp_path / "lone").mkdir()
    lone, lone_url = _study_with_pruner(tmp_path / "lone", monkeypatch)
    first = open_trial(SweepParams(study="s", trial=lone.ask().number, storage=lone_url), 60.0)
    [first.report(e, {"val_accuracy": 0.9}) for e in (1, 2, 3)]
    first.finish(pruned=False, best_epoch=3)
    second = open_trial(SweepParams(study="s", trial=lone.ask().number, storage=lone_url), 60.0)
    assert not any(second.report(e, {"val_accuracy": 0.1}) for e in (1, 2, 3))


def test_a_threshold_pruner_stops_a_trial_at_chance_after_its_warm_up_whatever_the_others_did(tmp_path, monkeypatch):
    from cifar_rounds.search.spec import ThresholdPruner

    study, url = _study_with_pruner(tmp_path, monkeypatch)
    study.set_user_attr("pruner", ThresholdPruner(kind="threshold", lower=0.11, warmup_epochs=2).model_dump())
    stuck = open_trial(SweepParams(study="s", trial=study.ask().number, storage=url), 60.0)  # the study's first
    assert stuck.report(1, {"val_accuracy": 0.1}) is False  # within the warm-up
    assert stuck.report(2, {"val_accuracy": 0.1}) is True
    learning = open_trial(SweepParams(study="s", trial=study.ask().number, storage=url), 60.0)
    assert not any(learning.report(e, {"val_accuracy": a}) for e, a in ((1, 0.1), (2, 0.2), (3, 0.3)))


def test_the_optimism_of_the_best_trial_is_the_expected_maximum_of_normal_draws():
    """The expected largest of n standard normals: 1/sqrt(pi) for 2, 3/(2 sqrt(pi)) for 3 (closed forms), and
    the mean best-minus-first of simulated equal trials for 12."""
    from cifar_rounds.search.report import selection_optimism

    assert selection_optimism(2, 1.0) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-6)
    assert selection_optimism(3, 2.0) == pytest.approx(2 * 3 / (2 * math.sqrt(math.pi)), abs=1e-6)
    draws = np.random.default_rng(0).normal(0.0, 0.005, (20_000, 12))
    assert selection_optimism(12, 0.005) == pytest.approx(np.mean(draws.max(axis=1) - draws[:, 0]), rel=0.02)


def test_a_moved_repository_keeps_its_queues_trials_and_another_repository_has_its_own_queue(tmp_path, monkeypatch):
    """A trial left RUNNING by the driver of a repository since moved is still its queue's, to settle; the
    queue's id lives beside DVC's queue state, not in the path."""
    from cifar_rounds.search.study import new_driver, queue_id

    (tmp_path / "a").mkdir()
    d = _git_driver(tmp_path / "a", monkeypatch)
    trial = d.study.ask()
    trial.set_user_attr("queue", d.queue)  # as the driver queues it
    (tmp_path / "a").rename(tmp_path / "b")
    moved = tmp_path / "b"
    monkeypatch.chdir(moved)
    monkeypatch.setenv("DVC_ROOT", str(moved))
    again = new_driver(load_sweep(moved / "sweep.yaml", repo_params(), load_preset), repo_params())
    assert again.queue == d.queue and again.ours(again.study.trials[trial.number])
    (tmp_path / "c").mkdir()
    assert queue_id(tmp_path / "c") != queue_id(moved) == queue_id(moved)
