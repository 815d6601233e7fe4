"""Presets and the round report's parts, on constructed rounds."""

import pytest

from cifar_rounds.analysis.champion import champion_decision
from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.report import condition_lines, noise_line, per_class_lines, resource_lines
from cifar_rounds.analysis.rounds import load_preset, scaled_milestones
from cifar_rounds.analysis.verdict import Verdict
from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.registry import round_alias

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
        (line,) = noise_line(_replicate([{"epoch": 1, "noise_scale": value}]))
        assert "not measurable" in line and "x below" not in line and "x above" not in line
    (line,) = noise_line(_replicate([{"epoch": 1, "noise_scale": 192.0}]))
    assert "the batch size 96 is 2x below it" in line
    lines = per_class_lines(_replicate(metrics={"per_class_accuracy": {"cat": 0.5, "ship": None}}))
    assert lines == ["cat: 50.00%", "ship: no images"]


def _verdict(difference: float = 0.02, p: float = 0.01, seeds: int = 2) -> Verdict:
    return Verdict(
        difference,
        difference - 0.01,
        difference + 0.01,
        0.95,
        p,
        0.05,
        p < 0.05,
        seeds,
        seeds,
        "test",
        "covers",
        "",
        None,
        0.005,
    )


def test_champion_moves_only_to_a_candidate_that_passes_and_beats_the_champions_round():
    better = _verdict()
    assert champion_decision("none", True, better, "a", "b") == (
        True,
        "there was no champion, and b passes its success criteria",
    )
    assert champion_decision("baseline", True, better, "a", "b")[0]
    assert champion_decision("candidate", True, better, "a", "b")[0]
    stays = {
        "does not pass its success criteria": ("none", False, better),
        "does not say b beats a": ("baseline", True, _verdict(p=0.2)),
        "(difference -2.00%": ("baseline", True, _verdict(difference=-0.02)),
        "not configurations": ("baseline", True, _verdict(seeds=1)),
        "comes from neither a nor b": ("other", True, better),
    }
    for why, (side, passes, v) in stays.items():
        move, reason = champion_decision(side, passes, v, "a", "b")
        assert not move and why in reason, reason
    assert round_alias("round-1") == "round-1" and round_alias("a,b c") == "a-b-c"
