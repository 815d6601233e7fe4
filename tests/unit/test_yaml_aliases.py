"""Params files, presets and sweep files refuse YAML anchors and aliases (a few nested aliases make a small file
enormous), and an error echoes at most a few dozen characters of the value it refused."""

import re
import resource
import subprocess
import sys
import time

import pytest
import yaml

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.params import PARAMS_FILE, ParamsError, load_params, params_from_text, with_overrides
from cifar_rounds.search.spec import load_sweep

from helpers import REPO, env, repo_params

ALIASES_REFUSED = re.escape("YAML aliases (*name) are not accepted")
LONG = "x" * 10_000  # a value whose echo would be a page
LONG_KEY = "k" * 1000  # YAML takes a key of up to 1024 characters


def alias_bomb(levels: int) -> str:
    """params.yaml with train.learning_rate a list of 9**levels values, written in a few hundred characters: each
    level is a list of the level below, given once with its anchor and then repeated eight times by alias."""
    value = "&l1 [x, x, x, x, x, x, x, x, x]"
    for level in range(2, levels + 1):
        value = f"&l{level} [{value}{f', *l{level - 1}' * 8}]"
    return (REPO / PARAMS_FILE).read_text().replace("learning_rate: 0.05", f"learning_rate: {value}")


def one_gib_of_memory() -> None:
    """At most 1 GiB for the process: code that expands the aliases fails fast instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))


def checked(path) -> tuple[subprocess.CompletedProcess, float]:
    """`cifar-rounds check PATH` in its own process of at most 1 GiB, and how long it took (s)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cifar_rounds.cli.check", str(path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=one_gib_of_memory,
    )
    return result, time.monotonic() - started


def test_a_nine_level_alias_bomb_is_one_short_line_from_the_cli_at_once(tmp_path):
    bomb = tmp_path / "params.yaml"
    bomb.write_text(alias_bomb(9))
    _, valid_s = checked(REPO / PARAMS_FILE)  # the command's own start-up, at this machine's load
    result, bomb_s = checked(bomb)
    assert bomb_s < valid_s + 5  # refused as it is read: 9**9 values are never built
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 300, result.stderr[:300]
    assert re.match(rf"error: {re.escape(str(bomb))}: line 12: {ALIASES_REFUSED}", result.stderr)


def test_a_five_level_alias_bomb_is_refused_naming_the_file_and_line(tmp_path):
    bomb = tmp_path / "params.yaml"
    bomb.write_text(alias_bomb(5))
    with pytest.raises(ParamsError) as error:
        load_params(bomb)
    message = str(error.value)
    assert len(message) < 300 and "\n" not in message, message[:300]
    assert re.match(rf"{re.escape(str(bomb))}: line 12: {ALIASES_REFUSED}", message)


@pytest.mark.parametrize(
    "anchored, aliased",
    [
        ("learning_rate: &lr 0.05", "lr_gamma: 0.2"),
        ("learning_rate: &lr 0.05", "lr_gamma: *lr"),
        ("learning_rate: *lr", ""),
    ],
)
def test_an_anchor_or_an_alias_is_refused(anchored, aliased):
    text = (REPO / PARAMS_FILE).read_text()
    params = text.replace("learning_rate: 0.05", anchored).replace("lr_gamma: 0.2", aliased)
    with pytest.raises(ParamsError, match=rf"^params.yaml: line 12: {ALIASES_REFUSED}"):
        params_from_text(params, PARAMS_FILE)


def test_a_preset_with_an_alias_is_refused(tmp_path):
    (tmp_path / "aliased.yaml").write_text("train:\n  learning_rate: &lr 0.05\n  lr_gamma: *lr\n")
    with pytest.raises(ParamsError, match=f"aliased.yaml: line 2: {ALIASES_REFUSED}"):
        load_preset("aliased", tmp_path)


def test_a_sweep_file_with_an_alias_is_refused(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "study: r3\nbaseline: round-2\ntrials: 4\nspace:\n"
        "  train.learning_rate: &range {type: float, low: 0.005, high: 0.2, log: true}\n"
        "  train.momentum: *range\n"
    )
    with pytest.raises(ParamsError, match=f"sweep.yaml: line 5: {ALIASES_REFUSED}"):
        load_sweep(sweep, repo_params(), load_preset)


def short_one_liner(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "…" in message and "x" * 50 not in message and "k" * 50 not in message
    return message


def test_a_long_wrong_value_is_echoed_cut_to_a_few_dozen_characters():
    in_file = (REPO / PARAMS_FILE).read_text().replace("learning_rate: 0.05", f"learning_rate: {LONG}")
    with pytest.raises(ParamsError) as error:
        params_from_text(in_file, PARAMS_FILE)
    assert "train.learning_rate" in short_one_liner(error)
    with pytest.raises(ParamsError) as error:  # a -S value reaches the same check through with_overrides
        with_overrides(repo_params(), {"train.learning_rate": LONG})
    assert "train.learning_rate" in short_one_liner(error)
    with pytest.raises(ParamsError) as error:
        with_overrides(repo_params(), {"train.lr_milestones": list(range(5000, 0, -1))})
    assert "strictly increasing" in short_one_liner(error)


def test_a_long_unknown_name_is_echoed_cut():
    with pytest.raises(ParamsError, match="unknown parameter") as error:
        with_overrides(repo_params(), {f"train.{LONG}": 1})
    short_one_liner(error)
    in_file = (REPO / PARAMS_FILE).read_text().replace("train:\n", f"train:\n  {LONG_KEY}: 1\n")
    with pytest.raises(ParamsError, match="unknown key") as error:
        params_from_text(in_file, PARAMS_FILE)
    short_one_liner(error)
    with pytest.raises(ParamsError, match="duplicate key") as error:
        params_from_text(in_file.replace("train:\n", f"train:\n  {LONG_KEY}: 1\n"), PARAMS_FILE)
    short_one_liner(error)


def test_a_sweep_value_outside_the_params_is_echoed_cut(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    space = {"train.monitor": {"type": "categorical", "choices": ["val_loss", LONG]}}
    sweep.write_text(yaml.safe_dump({"study": "r3", "baseline": "round-2", "trials": 4, "space": space}))
    with pytest.raises(ParamsError, match="space.train.monitor") as error:
        load_sweep(sweep, repo_params(), load_preset)
    short_one_liner(error)


@pytest.mark.parametrize(
    "value, why",
    [("[" * 3000 + "]" * 3000, "nested too deeply"), ("9" * 5000, "4300 digits"), ("2020-13-01", "month")],
)
def test_yaml_that_cannot_be_built_is_one_line_naming_the_file(value, why):
    in_file = (REPO / PARAMS_FILE).read_text().replace("learning_rate: 0.05", f"learning_rate: {value}")
    with pytest.raises(ParamsError, match=f"^params.yaml: not valid YAML .*{why}"):
        params_from_text(in_file, PARAMS_FILE)
