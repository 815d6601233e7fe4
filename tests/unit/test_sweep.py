"""The search for round N+1: sweep files, the trial hook, the workers' loop and clones, promotion, proposals."""

from __future__ import annotations

import io
import math
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
from cifar_rounds.training.trial import NoTrial, StudyTrial, open_trial

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
        "import sys; from cifar_rounds.training.trial import open_trial; from "
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
    from cifar_rounds.search.spec import Objective
    from cifar_rounds.training.pruners import MedianPruner

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.set_user_attr("objective", Objective().model_dump())
    study.set_user_attr("pruner", MedianPruner(kind="median", startup_trials=2, warmup_epochs=2).model_dump())
    return study, url


def test_the_trial_hook_reports_prunes_by_the_studys_pruner_and_the_worker_returns_the_monitors_epoch(
    tmp_path, monkeypatch
):
    from cifar_rounds.search.worker import FINAL_ATTR, TrialFailed, reported

    study, url = _study_with_pruner(tmp_path, monkeypatch)
    # two good trials complete; train.monitor (val_loss) chose epoch 3 in both: their checkpoints are evaluated
    values = []
    for accuracies in ([0.5, 0.7, 0.6], [0.5, 0.65, 0.8]):
        number = study.ask().number
        trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
        assert isinstance(trial, StudyTrial)
        assert not any(trial.report(e, {"val_accuracy": a}) for e, a in enumerate(accuracies, 1))
        assert trial.finish(pruned=False, best_epoch=3) == "COMPLETE"
        assert study.trials[number].state.name == "RUNNING"  # until its worker has the experiment saved
        values.append(reported(study._storage, "s", number))
        study.tell(number, values[-1])
    # the value at the monitor's best epoch (0.6), not the best of all epochs (0.7)
    assert values == [0.6, 0.8]
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
    assert trial.report(1, {"val_accuracy": 0.1}) is False  # within the warm-up: never pruned
    assert trial.report(2, {"val_accuracy": 0.1}) is True  # far below the median at epoch 2
    assert trial.finish(pruned=True, best_epoch=1) == "PRUNED"
    with pytest.raises(optuna.TrialPruned):
        reported(study._storage, "s", number)
    silent = study.ask().number  # reported nothing (it died before its first epoch ended)
    with pytest.raises(TrialFailed):
        reported(study._storage, "s", silent)
    assert study.trials[silent].user_attrs[FINAL_ATTR] == "no finite objective"  # not tried again
    # a finished trial is not reported to again (an applied experiment rerun later)
    assert isinstance(open_trial(SweepParams(study="s", trial=0, storage=url), 60.0), NoTrial)


def _worker(d):
    from cifar_rounds.core.interrupts import Interrupts
    from cifar_rounds.search.worker import Worker

    return Worker(d, None, "HEAD", 1, None, Interrupts())


def test_a_failed_trial_is_tried_again_by_optunas_retry_and_only_its_second_own_failure_counts(tmp_path, monkeypatch):
    from cifar_rounds.search.study import counts, spent
    from cifar_rounds.search.worker import FAILURES_ATTR, FINAL_ATTR, TrialFailed

    d = _git_driver(tmp_path, monkeypatch, enqueue=[])  # no preset waits before the retry
    worker = _worker(d)

    def failing(trial):
        d.trial_values(trial)  # the values suggested, as a real trial's
        trial.set_user_attr(FAILURES_ATTR, trial.user_attrs.get(FAILURES_ATTR, 0) + 1)  # as the worker counts them
        raise TrialFailed("its experiment failed")

    d.study.optimize(failing, n_trials=1, catch=(TrialFailed,), callbacks=[worker.ended])
    first = d.study.trials[0]
    waiting = [t for t in d.study.trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].params == first.params  # the same values, queued by Optuna's retry
    assert counts(d.study) == {"RETRIED": 1, "WAITING": 1} and spent(d.study) == 0
    d.study.optimize(failing, n_trials=1, catch=(TrialFailed,), callbacks=[worker.ended])
    assert d.study.trials[1].params == first.params  # the retry ran next
    assert counts(d.study) == {"RETRIED": 1, "FAIL": 1} and spent(d.study) == 1  # a second failure counts

    def invalid(trial):
        d.trial_values(trial)
        trial.set_user_attr(FINAL_ATTR, "invalid values")
        raise TrialFailed("invalid values")

    d.study.optimize(invalid, n_trials=1, catch=(TrialFailed,), callbacks=[worker.ended])
    assert counts(d.study) == {"RETRIED": 1, "FAIL": 2}  # values that cannot succeed are not tried again

    def stopped(trial):
        d.trial_values(trial)
        raise TrialFailed("stopped with its sweep")  # no failure of its own counted

    for _ in range(3):  # the sweep stopped during this trial, its retry and the retry's
        d.study.optimize(stopped, n_trials=1, catch=(TrialFailed,), callbacks=[worker.ended])
    assert counts(d.study) == {"RETRIED": 4, "FAIL": 2, "WAITING": 1}


def test_workers_that_started_together_past_the_budget_leave_the_last_started_trial_surplus(tmp_path, monkeypatch):
    from cifar_rounds.search.study import counts, spent
    from cifar_rounds.search.worker import surplus

    d = _git_driver(tmp_path, monkeypatch, trials=2, enqueue=[])
    done = d.study.ask()
    d.study.tell(done, 0.5)
    late = [d.study.ask(), d.study.ask()]  # two workers asked at the same moment for the last place
    assert spent(d.study) == 3
    assert [surplus(d.study, t.number, 2) for t in late] == [False, True]
    late[1].set_user_attr("surplus", True)
    d.study.tell(late[1], state=optuna.trial.TrialState.FAIL)
    assert spent(d.study) == 2 and counts(d.study) == {"COMPLETE": 1, "RUNNING": 1, "SURPLUS": 1}


def test_a_trial_whose_worker_died_is_failed_by_optunas_heartbeat_and_retried_with_its_runs_ended(
    tmp_path, monkeypatch
):
    """The storage as workers open it: heartbeat on, every call still waited out; the stale callback ends the
    trial's MLflow runs, tagged why, and queues its values again."""

    from cifar_rounds.search.study import open_study
    from cifar_rounds.training.trial import study_storage

    d = _git_driver(tmp_path, monkeypatch, enqueue=[])
    worker = _worker(d)
    heartbeat = {"heartbeat_interval": 1, "grace_period": 1, "heartbeat_stale_trial_callback": worker.stale}
    url = study_storage(d.sweep.storage, tmp_path)
    study, storage, _ = open_study(d.sweep, url, 60.0, "w", heartbeat)
    assert storage.get_heartbeat_interval() == 1
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)  # as the dead worker's heartbeat thread last did
    experiment = d.client.get_run(d.parent_run_id).info.experiment_id
    training = d.client.create_run(experiment, tags={"sweep": "r3", "sweep.trial": str(trial.number)}).info.run_id
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "WAITING"] and study.trials[1].params == trial.params
    ended = d.client.get_run(training)
    assert ended.info.status == "KILLED" and ended.data.tags["sweep.trial_state"] == "FAIL"
    assert "sent no heartbeat" in ended.data.tags["cifar_rounds.end_reason"]


def test_a_stale_trial_that_two_workers_failed_at_the_same_moment_is_tried_again_once(tmp_path, monkeypatch, capsys):
    """Both workers' check-and-set of its state can succeed on SQLite (Optuna relies on SELECT ... FOR UPDATE), and
    each then calls back: its values are queued once, and said once."""
    d = _git_driver(tmp_path, monkeypatch, enqueue=[])
    trial = d.study.ask()
    d.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for worker in (_worker(d), _worker(d)):
        worker.ended(d.study, d.study.get_trials()[trial.number])
    assert [t.state.name for t in d.study.trials] == ["FAIL", "WAITING"]
    assert capsys.readouterr().out.count("trying its values again") == 1


def test_a_worker_takes_the_first_free_clone_and_resets_it_to_the_commit_and_the_workspaces_params(tmp_path):
    from cifar_rounds.analysis.clones import head_commit, take_clone, uncommitted

    root = tmp_path / "repo"
    root.mkdir()
    run(["git", "init", "-q"], root)
    Repo.init(str(root)).close()
    (root / "params.yaml").write_text("a: 1\n")
    (root / "code.py").write_text("x = 1\n")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "base"], root)
    commit = head_commit(root)
    (root / "params.yaml").write_text("a: 2\n")  # what `rounds run` left in the workspace: the trials start from it
    (root / "code.py").write_text("x = 2\n")
    assert uncommitted(root) == ["code.py"]
    first = take_clone(root)
    second = take_clone(root)  # the first is held
    assert (first.path.name, second.path.name) == ("w0", "w1")
    (first.path / "stale.txt").write_text("an earlier trial's output")
    first.reset(commit)
    assert (first.path / "params.yaml").read_text() == "a: 2\n" and (first.path / "code.py").read_text() == "x = 1\n"
    assert not (first.path / "stale.txt").exists() and head_commit(first.path) == commit
    cache = run([sys.executable, "-m", "dvc", "cache", "dir"], first.path).stdout.strip()
    assert Path(cache) == root / ".dvc" / "cache"  # one cache, shared
    first.lock.close()  # its worker ended: free again, and reused as it is
    assert take_clone(root).path == first.path


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
    assert all(f"cifar-rounds sweep {f}" in "".join(lines) for f in files)
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


def test_a_trial_ended_by_the_driver_while_it_trains_stops_in_one_line(tmp_path, monkeypatch):
    from cifar_rounds.core.errors import StageError

    study, url = _study_with_pruner(tmp_path, monkeypatch)
    number = study.ask().number
    trial = open_trial(SweepParams(study="s", trial=number, storage=url), 60.0)
    assert trial.report(1, {"val_accuracy": 0.5}) is False
    study.tell(number, state=optuna.trial.TrialState.FAIL)  # the driver took it for lost
    with pytest.raises(StageError, match=rf"^sweep: trial {number} of 's' was ended \(FAIL\) while this run trained"):
        trial.report(2, {"val_accuracy": 0.6})


def test_a_threshold_pruner_stops_a_trial_at_chance_after_its_warm_up_whatever_the_others_did(tmp_path, monkeypatch):
    from cifar_rounds.training.pruners import ThresholdPruner

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
