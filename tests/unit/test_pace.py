"""How long a training takes: the line after a first epoch, and the estimate before a CPU training."""

import re
import sys
from datetime import datetime, timedelta, timezone

import pytest
import torch

from cifar_rounds.core.params import dump_params, with_overrides
from cifar_rounds.training import pace
from cifar_rounds.training.pace import duration, epoch_seconds, estimate_lines, finish_line

from helpers import repo_params


@pytest.mark.parametrize(
    "seconds, shown",
    [(12.34, "12.3 s"), (59.9, "59.9 s"), (3060, "51 min"), (9.8 * 3600, "9.8 h"), (10.2 * 86400, "10.2 days")],
)
def test_a_duration_is_shown_in_the_unit_a_person_reads_at_a_glance(seconds, shown):
    assert duration(seconds) == shown


def test_after_the_first_epoch_its_time_the_epochs_left_and_when_the_last_ends_in_utc():
    now = datetime(2026, 12, 7, 0, 32, tzinfo=timezone(timedelta(hours=1)))  # 23:32 UTC
    assert finish_line(1, 12.3, 249, now) == (
        "train: epoch 1 took 12.3 s; 249 epochs to go: about 51 min (ends about 2026-12-07 00:23 UTC)"
    )
    assert finish_line(7, 30.0, 1, now).endswith("1 epoch to go: about 30.0 s (ends about 2026-12-06 23:32 UTC)")
    # a resume's first epoch, and an epoch after which nothing is left: its time alone
    assert finish_line(250, 12.3, 0, now) == "train: epoch 250 took 12.3 s"


def test_an_epoch_is_its_training_batches_and_a_cheaper_validation():
    assert epoch_seconds(2.0, 100, 5000) == 450 * 2.0 + 50 * 2.0 / 3  # 45,000 training images, 5,000 evaluated
    assert epoch_seconds(2.0, 96, 0) == 520 * 2.0  # the last partial batch is dropped, as the training does


def test_the_estimate_names_the_configured_training_its_duration_and_the_short_runs():
    params = with_overrides(repo_params(), {"model.width": 64, "train.batch_size": 100, "train.num_epochs": 250})
    lines = estimate_lines(params, 4.0)
    assert lines[0].endswith("ResNet-18 width 64, batch 100 took 4.0 s on this CPU")
    epoch = epoch_seconds(4.0, 100, params.data.val_size)
    assert f"takes about {duration(epoch)}, the configured 250 epochs about {duration(250 * epoch)}" in lines[1]
    assert all(command in lines[2] for command in pace.SHORT_RUNS)
    assert f"--epochs {pace.SHORT_EPOCHS} (about {duration(pace.SHORT_EPOCHS * epoch)} at this pace)" in lines[2]


def test_the_estimate_runs_before_a_cpu_training_and_says_nothing_before_a_gpu_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pace", "--steps", "1"])
    narrow = {"model.width": 4, "train.batch_size": 8, "train.precision": "fp32"}
    dump_params(with_overrides(repo_params(), {**narrow, "train.device": "cpu"}), tmp_path / "params.yaml")
    pace.main()
    out = capsys.readouterr().out
    # one measured step of the configured (here narrow) model, in seconds
    assert re.match(r"pipeline: no GPU here: a training step of ResNet-18 width 4, batch 8 took \d+\.\d s ", out)
    assert out.count("\n") == 4
    monkeypatch.setattr(pace, "select_device", lambda choice: torch.device("cuda"))
    pace.main()
    assert capsys.readouterr().out == ""
