import pytest
import yaml

from cifar_rounds.core.params import (
    MAX_SEED,
    PARAMS_FILE,
    Params,
    ParamsError,
    all_field_names,
    load_params,
    params_from_text,
    parse_params,
    with_overrides,
)

from helpers import BAD, REPO, repo_params


def test_params_yaml_is_valid_and_sets_every_field():
    params = load_params(REPO / PARAMS_FILE)
    assert sorted(params.flat()) == sorted(all_field_names())


@pytest.mark.parametrize("name", all_field_names())
def test_a_missing_field_is_an_error_that_names_it(name):
    raw = _raw()
    section, key = name.split(".")
    del raw[section][key]
    with pytest.raises(ParamsError, match=rf"{name}: missing"):
        parse_params(raw)


def test_a_misspelt_key_suggests_the_nearest_field():
    raw = _raw()
    raw["train"]["learning_rat"] = raw["train"].pop("learning_rate")
    with pytest.raises(ParamsError, match=r"unknown key 'train.learning_rat' \(did you mean train.learning_rate\?\)"):
        parse_params(raw)


def test_a_key_given_twice_is_refused_as_dvc_refuses_it():
    text = (REPO / PARAMS_FILE).read_text().replace("  momentum: 0.9\n", "  momentum: 0.9\n  momentum: 0.5\n")
    with pytest.raises(ParamsError, match="duplicate key 'momentum'"):
        params_from_text(text, PARAMS_FILE)


def test_seeds_reach_exactly_the_range_torch_accepts():
    import torch

    torch.Generator().manual_seed(MAX_SEED)  # the largest accepted seed is accepted by torch too
    assert parse_params(_raw(**{"data.seed": MAX_SEED, "train.seed": MAX_SEED})).train.seed == MAX_SEED
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(MAX_SEED + 1)
    for field in ("data.seed", "train.seed"):
        with pytest.raises(ParamsError, match=field):
            parse_params(_raw(**{field: MAX_SEED + 1}))


def test_every_field_is_documented():
    for section in Params.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, name


def test_flat_names_match_dvc_params_diff():
    flat = repo_params().flat()
    assert flat["train.learning_rate"] == 0.05
    assert flat["data.md5"] == "c58f30108f718f92721af3b95e74349a"
    assert all("." in k for k in flat)


def _raw(**changes):
    raw = repo_params().model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


@pytest.mark.parametrize("changes,field", BAD, ids=[next(iter(c)) + "=" + repr(next(iter(c.values()))) for c, _ in BAD])
def test_bad_values_are_refused_with_the_field_named(changes, field):
    with pytest.raises(ParamsError) as error:
        parse_params(_raw(**changes))
    message = str(error.value)
    assert field in message and "\n" not in message


def test_unknown_section_and_non_mapping_are_refused():
    with pytest.raises(ParamsError, match="unknown key 'optimizer'"):
        parse_params({**_raw(), "optimizer": {}})
    with pytest.raises(ParamsError, match="mapping"):
        parse_params([1, 2])


def test_overrides_are_validated():
    assert with_overrides(repo_params(), {"train.num_epochs": 3, "train.lr_milestones": [1]}).train.num_epochs == 3
    with pytest.raises(ParamsError, match="unknown parameter 'train.epochs' \\(did you mean train.num_epochs\\?\\)"):
        with_overrides(repo_params(), {"train.epochs": 3})


def params_cli_refusal(path, capsys) -> str:
    """What `cifar-rounds check PATH` prints to stderr as it exits 1, run in this process."""
    from cifar_rounds.cli.check import main

    with pytest.raises(SystemExit) as stopped:
        main([str(path)])
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""  # nothing else printed
    return err


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_raw(**{"train.lr_gamma": 2.0})))
    message = params_cli_refusal(bad, capsys)
    assert message.startswith("error: ") and message.count("\n") == 1 and "train.lr_gamma" in message
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    assert "not valid YAML" in params_cli_refusal(tmp_path / "broken.yaml", capsys)


def test_a_registered_model_name_that_a_models_uri_cannot_carry_is_refused_by_name():
    for bad in ("a/b", "name@champion", "", "-x", "a:b"):
        with pytest.raises(ParamsError, match="tracking.registered_model"):
            parse_params(_raw(**{"tracking.registered_model": bad}))
    assert parse_params(_raw(**{"tracking.registered_model": "cifar.rounds_v2-x"})).tracking.registered_model
