import subprocess
import sys

import pytest
import yaml

from cifar_rounds.params import PARAMS_FILE, Params, ParamsError, load_params, parse_params, with_overrides
from conftest import REPO

SEED_ROUND_2 = {
    "learning_rate": 0.05, "lr_milestones": [60, 120, 160], "lr_gamma": 0.2, "weight_decay": 5e-4,
    "batch_size": 96, "num_epochs": 250, "patience": 35, "min_delta": 0.0005,
}


def test_defaults_are_the_seed_round_2_and_params_yaml_matches_them():
    train = Params().train.model_dump()
    assert {k: train[k] for k in SEED_ROUND_2} == SEED_ROUND_2
    assert load_params(REPO / PARAMS_FILE) == Params()


def test_every_field_is_documented():
    for section in Params.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, name


def test_flat_names_match_dvc_params_diff():
    flat = Params().flat()
    assert flat["train.learning_rate"] == 0.05
    assert flat["data.md5"] == "c58f30108f718f92721af3b95e74349a"
    assert all("." in k for k in flat)


def _raw(**changes):
    raw = Params().model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


BAD = [
    ({"train.learning_rat": 0.1}, "learning_rat"),
    ({"train.learning_rate": -0.1}, "train.learning_rate"),
    ({"train.learning_rate": 0}, "train.learning_rate"),
    ({"train.learning_rate": "0.05"}, "train.learning_rate"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": 96.5}, "train.batch_size"),
    ({"train.lr_milestones": [120, 60, 160]}, "lr_milestones"),
    ({"train.lr_milestones": [60, 60]}, "lr_milestones"),
    ({"train.lr_milestones": [60, 120, 300]}, "lr_milestones"),
    ({"train.lr_gamma": 0}, "train.lr_gamma"),
    ({"train.lr_gamma": 1.5}, "train.lr_gamma"),
    ({"train.momentum": 1.0}, "train.momentum"),
    ({"train.monitor": "val_acc"}, "train.monitor"),
    ({"train.nesterov": "yes"}, "train.nesterov"),
    ({"train.patience": 0}, "train.patience"),
    ({"train.min_delta": -0.001}, "train.min_delta"),
    ({"train.precision": "fp16"}, "train.precision"),
    ({"data.val_size": 50000}, "data.val_size"),
    ({"data.md5": "not-a-checksum"}, "data.md5"),
    ({"model.width": 0}, "model.width"),
    ({"tracking.grad_norm_interval": 0}, "tracking.grad_norm_interval"),
]


@pytest.mark.parametrize("changes,field", BAD, ids=[next(iter(c)) + "=" + repr(next(iter(c.values()))) for c, _ in BAD])
def test_bad_values_are_refused_with_the_field_named(changes, field):
    with pytest.raises(ParamsError) as error:
        parse_params(_raw(**changes))
    message = str(error.value)
    assert field in message and "\n" not in message


def test_unknown_section_and_non_mapping_are_refused():
    with pytest.raises(ParamsError, match="unknown key 'optimizer'"):
        parse_params({**Params().model_dump(), "optimizer": {}})
    with pytest.raises(ParamsError, match="mapping"):
        parse_params([1, 2])


def test_overrides_are_validated():
    assert with_overrides(Params(), {"train.num_epochs": 3, "train.lr_milestones": [1]}).train.num_epochs == 3
    with pytest.raises(ParamsError, match="unknown parameter"):
        with_overrides(Params(), {"train.epochs": 3})


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_raw(**{"train.lr_gamma": 2.0})))
    result = subprocess.run([sys.executable, "-m", "cifar_rounds.params", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "train.lr_gamma" in result.stderr
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "cifar_rounds.params", str(tmp_path / "broken.yaml")], capture_output=True, text=True)
    assert result.returncode != 0 and "not valid YAML" in result.stderr
