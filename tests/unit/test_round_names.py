"""Round names: one character set, values that reach params.yaml as typed, one round per alias, no empty name."""

import dataclasses
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_champion import registry, round_of

from cifar_rounds.analysis import rounds
from cifar_rounds.analysis.champion import plan_aliases
from cifar_rounds.analysis.registry_state import ALIAS_ROUND_TAG, apply_plan
from cifar_rounds.analysis.replicates import find_round
from cifar_rounds.analysis.report import round_verdict
from cifar_rounds.analysis.rounds import exp_run_command, round_values
from cifar_rounds.core.errors import ParamsError, StageError
from cifar_rounds.core.params import PARAMS_FILE, with_overrides
from cifar_rounds.tracking.registry import model_tags

from helpers import REPO, repo_params


@pytest.mark.parametrize("name", ["rönd", "r.2", "a\\b", 'a"b', "a b", "-x", "r/2", ""])
def test_a_round_name_outside_its_characters_is_refused_in_one_line_naming_the_field(name, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(ParamsError, match="tracking.round"):
        round_values("round-1", name, [], None, None)
    monkeypatch.setattr(sys, "argv", ["rounds", "run", "round-1", f"--name={name}", "--epochs", "2"])
    with pytest.raises(SystemExit) as stopped:
        rounds.run_stage(rounds.main)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.count("\n") == 1 and "tracking.round" in err, err


def test_a_sweeps_study_name_is_held_to_the_same_characters(tmp_path, monkeypatch):
    from cifar_rounds.analysis.rounds import load_preset
    from cifar_rounds.search.spec import load_sweep

    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "sweeps/round-3.yaml").read_text())
    for bad in ("stüdy", "s.1"):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**spec, "study": bad}))
        with pytest.raises(ParamsError, match="study"):
            load_sweep(path, repo_params(), load_preset)


def overridden(values: dict[str, object], tmp_path) -> dict:
    """params.yaml after DVC's own override parser applied `exp_run_command`'s -S arguments to it."""
    from dvc.utils.hydra import apply_overrides

    target = tmp_path / "params.yaml"
    target.write_text((REPO / PARAMS_FILE).read_text())
    command = exp_run_command("x", values, [])
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "-S"]
    apply_overrides(target, sets)
    return yaml.safe_load(target.read_text())


def test_values_reach_params_yaml_as_typed_through_dvcs_override_parser(tmp_path):
    values = {
        "tracking.run_name": "rönd — ünïcode",
        "tracking.experiment_name": 'it\'s "quoted", [here] {now}: x=1 $HOME',
        "data.url": "https://example.org/a%20b/cifar.tar.gz?x=1&y=2",
        "train.learning_rate": 0.05,
        "train.lr_milestones": [1, 2],
        "tracking.planned_seeds": None,
        "diagnostics.sharpness": False,
    }
    written = overridden(values, tmp_path)
    for key, value in values.items():
        section, field = key.split(".")
        assert written[section][field] == value, key
    with_overrides(repo_params(), values)


@pytest.mark.parametrize("value", ["a\\b", "a${b}", "a\nb", "a\tb"])
def test_a_value_that_cannot_reach_dvc_as_typed_is_refused_naming_its_key(value):
    with pytest.raises(StageError, match="tracking.run_name"):
        exp_run_command("x", {"tracking.run_name": value}, [])


@pytest.mark.parametrize("ref", ["", " ", "HEAD,", ",HEAD", "a,,b"])
def test_an_empty_round_name_is_refused_not_read_as_the_workspace(ref):
    with pytest.raises(StageError, match="an empty name"):
        find_round(ref, repo_params(), REPO, None)


def test_a_round_whose_alias_another_round_holds_is_refused_naming_both():
    base, dotted, dashed = round_of("rb", 0.5), round_of("r.2", 0.55), round_of("r-2", 0.55)
    v = round_verdict(base, dashed, 0.05)
    state = registry(base, dashed)
    state = dataclasses.replace(state, alias_rounds={"r-2": "r.2"})  # r.2 moved @r-2 before
    with pytest.raises(StageError, match="round 'r-2': its alias @r-2 belongs to round 'r.2'"):
        plan_aliases(state, base, dashed, (True, True), v)
    with pytest.raises(StageError, match="round 'r-2': its alias @r-2 belongs to round 'r.2'"):
        plan_aliases(registry(dotted, dashed), dotted, dashed, (True, True), round_verdict(dotted, dashed, 0.05))
    assert plan_aliases(registry(base, dashed), base, dashed, (True, True), v).claims[0] == ("rb", "rb")


def test_moving_a_round_alias_records_its_round_in_a_real_registry(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    base, cand = round_of("rb", 0.5), round_of("r.2", 0.55)
    state = registry(base, cand)
    client.create_registered_model(state.name)
    for version in state.versions.values():
        client.create_model_version(state.name, f"file://{tmp_path}", run_id=None)
        assert version.name == state.name
    plan = plan_aliases(state, base, cand, (True, True), round_verdict(base, cand, 0.05))
    assert ("r-2", "r.2") in plan.claims
    apply_plan(client, state, plan, 5.0)
    tags = model_tags(client, state.name, 5.0)
    assert tags[ALIAS_ROUND_TAG.format(alias="r-2")] == "r.2" and tags[ALIAS_ROUND_TAG.format(alias="rb")] == "rb"
    assert str(client.get_model_version_by_alias(state.name, "r-2").version) == dict(plan.moves)["r-2"].version
