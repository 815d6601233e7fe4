"""Presets and the round report's parts, on constructed rounds."""

import json

import pytest
import yaml

from cifar_rounds.analysis.details import noise_line, per_class_lines
from cifar_rounds.analysis.replicates import ArtifactPaths, Replicate, Round, parse_replicate
from cifar_rounds.analysis.report import condition_lines, resource_lines
from cifar_rounds.analysis.rounds import load_preset, scaled_milestones
from cifar_rounds.core.errors import StageError

from helpers import REPO, SEED_CHANGES, repo_params


def test_presets_are_the_seed_rounds_and_differ_in_exactly_seven_values(monkeypatch):
    monkeypatch.chdir(REPO)
    one, two = load_preset("round-1"), load_preset("round-2")
    assert one["train.learning_rate"] == 0.01 and two["train.batch_size"] == 96
    assert one.keys() == two.keys()
    assert {k for k in one if one[k] != two[k]} == SEED_CHANGES


def test_a_preset_with_a_bad_value_or_key_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "bad.yaml").write_text("train:\n  learning_rate: -1\n")
    (tmp_path / "typo.yaml").write_text("train:\n  lr: 0.1\n")
    with pytest.raises(StageError, match="bad.yaml: overrides: train.learning_rate"):
        load_preset("bad", tmp_path)
    with pytest.raises(StageError, match="unknown parameter 'train.lr'"):
        load_preset("typo", tmp_path)
    with pytest.raises(StageError, match="no such preset; presets here: bad, typo"):
        load_preset("round-9", tmp_path)


def test_shortened_runs_keep_their_milestones_at_the_same_fractions():
    assert scaled_milestones([60, 120, 160], 200, 4) == [1, 2, 3]
    assert scaled_milestones([60, 120, 160], 250, 10) == [2, 5, 6]
    assert scaled_milestones([60, 120, 160], 200, 2) == [1]  # collisions merge; none reaches the end


def test_report_states_peak_memory_and_throughput_of_both_rounds():
    def round_of(label, *histories):
        return Round(label, [Replicate(label, repo_params(), {}, list(h), []) for h in histories])

    base = round_of(
        "a",
        [
            {"peak_memory_mb": 100.0, "images_per_s": 50.0},
            {"peak_memory_mb": 120.0, "images_per_s": 70.0},
            {"peak_memory_mb": 110.0, "images_per_s": 60.0},
        ],
    )
    cand = round_of(
        "b", [{"peak_memory_mb": 200.0, "images_per_s": 90.0}], [{"peak_memory_mb": 220.0, "images_per_s": 110.0}]
    )
    memory, throughput = resource_lines(base, cand)
    assert memory.startswith("- peak memory, MiB") and memory.endswith(": 120 (n = 1) -> 210 ± 14 (n = 2)")
    assert throughput.endswith(": 60 (n = 1) -> 100 ± 14 (n = 2)")
    unrecorded = round_of("c", [{"peak_memory_mb": float("nan"), "images_per_s": 5.0}])  # an older run's history
    assert resource_lines(unrecorded, unrecorded)[0].endswith(": not measured -> not measured")


def test_report_flags_rounds_trained_under_different_conditions():
    fp32, bf16 = (
        Round(label, [Replicate(label, repo_params(), {}, [], [], {"device": "cpu", "precision": p})])
        for label, p in (("a", "fp32"), ("b", "bf16"))
    )
    lines = condition_lines(fp32, bf16)
    assert "- precision: fp32 -> bf16 (changed)" in lines and "- device: cpu" in lines
    assert any("different conditions" in line for line in lines)
    assert not any("different conditions" in line for line in condition_lines(fp32, fp32))


def _replicate(history=(), metrics=None):
    return Replicate("r", repo_params(), metrics or {}, list(history), [])


def test_a_non_positive_or_nan_noise_scale_is_not_measurable_and_an_empty_class_has_no_images():
    for value in (-3.0, 0.0, float("inf"), float("nan")):
        (line,) = noise_line(Round("r", [_replicate([{"epoch": 1, "noise_scale": value}])]))
        assert "not measurable" in line and "x below" not in line and "x above" not in line
    (line,) = noise_line(Round("r", [_replicate([{"epoch": 1, "noise_scale": 192.0}])]))
    assert "the batch size 96 is 2x below it" in line
    # as the batch rule reads it: the mean over the seeds, 474 here, not seed 0's 623
    seeds = Round("r", [_replicate([{"epoch": 6, "noise_scale": b}]) for b in (623.0, 296.0, 502.0)])
    (line,) = noise_line(seeds)
    assert "473.7 (mean of 3 seeds, 296 to 623); the batch size 96 is 4.93x below it" in line, line
    lines = per_class_lines(_replicate(metrics={"per_class_accuracy": {"cat": 0.5, "ship": None}}))
    assert lines == ["cat: 50.00%", "ship: no images"]


GOOD_METRICS = {
    "test_accuracy": 0.8,
    "train_accuracy": 0.9,
    "val_accuracy": 0.79,
    "train_loss": 0.3,
    "val_loss": 0.6,
    "best_epoch": 2,
    "stopped_epoch": 3,
    "mlflow_run_id": "abc",
}
HISTORY = "epoch,train_accuracy,val_accuracy,train_loss,val_loss,learning_rate\n1,0.5,0.4,1.2,1.3,0.05\n"
PATHS = ArtifactPaths(
    "metrics.json", "reports/history.csv", "reports/test_predictions.csv", "reports/run_conditions.json"
)


def _parsed(metrics: object, history: str = HISTORY) -> Replicate:
    params = yaml.safe_dump(repo_params().model_dump())
    return parse_replicate(
        "round-1-s0", params, json.dumps(metrics), history, "index,actual,predicted\n0,cat,dog\n", None, PATHS
    )


def test_a_replicates_metrics_are_checked_where_they_are_read_and_a_gap_is_one_line_naming_it():
    assert _parsed(GOOD_METRICS).metrics == GOOD_METRICS
    assert _parsed(GOOD_METRICS).predictions == [("cat", "dog")]
    lacking = {k: v for k, v in GOOD_METRICS.items() if k != "train_accuracy"}
    for metrics, message in (
        (lacking, "round-1-s0: its metrics.json lacks 'train_accuracy'"),
        ([GOOD_METRICS], "round-1-s0: its metrics.json is a JSON list, expected an object"),
        ({**GOOD_METRICS, "val_loss": "low"}, "round-1-s0: its metrics.json has 'val_loss' = 'low', expected a number"),
        ({**GOOD_METRICS, "mlflow_run_id": 7}, "round-1-s0: its metrics.json has 'mlflow_run_id' = 7"),
        ({**GOOD_METRICS, "per_class_accuracy": [0.5]}, "'per_class_accuracy' that is not an object"),
    ):
        with pytest.raises(StageError, match=message.replace("(", r"\(")) as error:
            _parsed(metrics)
        assert "\n" not in str(error.value)
    with pytest.raises(StageError, match="round-1-s0: its history.csv lacks the column 'val_loss'"):
        _parsed(GOOD_METRICS, HISTORY.replace("val_loss", "other"))
    with pytest.raises(StageError, match="round-1-s0: its history.csv has no epochs"):
        _parsed(GOOD_METRICS, HISTORY.splitlines()[0])
