"""The next round's sweep files, as the report writes them, start as written in a real project."""

from __future__ import annotations

import sys

from cifar_rounds.analysis.proposals import next_round_lines
from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.params import load_params, with_overrides
from cifar_rounds.search.spec import load_sweep

from helpers import make_project, run

# a comma-list round, run with values overridden away from its preset: weight decay 0 (a log range [0, 0]), a
# learning rate below the preset's, a patience longer than the milestones' gaps, and a momentum no sweep searches
OVERRIDES = {"train.weight_decay": 0.0, "train.learning_rate": 0.01, "train.patience": 80, "train.momentum": 0.8}


def every_proposal() -> Replicate:
    """A replicate of round-2 that crosses every proposal's line: memorised, stopped early, small batch, sharp."""
    values = {**load_preset("round-2"), "tracking.round": "round-2", "tracking.preset": "round-2", **OVERRIDES}
    params = with_overrides(load_params(), values)
    history = [
        {
            "epoch": e,
            "train_accuracy": 1.0,
            "train_val_accuracy_gap": 0.2,
            "noise_scale": 1000.0,
            "lambda_max": 90.0,
            "stability_bound": 100.0,
        }
        for e in range(1, 46)
    ]
    return Replicate("r", params, {"stopped_epoch": 45, "best_epoch": 45}, history, [])


def test_each_proposed_sweep_file_loads_and_starts(tmp_path, archive, monkeypatch):
    project = make_project(tmp_path / "project", archive)
    monkeypatch.chdir(project)
    rep = every_proposal()
    next_round_lines(Round("round-2-s0,round-2-s1", [rep, rep]), load_params().report, project / "next")
    files = sorted((project / "next").glob("*.yaml"))
    assert [f.stem for f in files] == ["batch", "learning-rate", "patience", "regularisation"]
    for path in files:
        sweep = load_sweep(path, load_params(), load_preset)
        out = run([sys.executable, "-m", "cifar_rounds.search.sweep", str(path), "--no-run"], project).stdout
        assert f"study {sweep.study!r}" in out, out
