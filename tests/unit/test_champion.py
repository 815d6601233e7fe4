"""Which version @<round> and @champion point at, decided on constructed rounds, verdicts and registry states."""

import dataclasses

import numpy as np
import pytest
from mlflow.entities.model_registry import ModelVersion

from cifar_rounds.analysis.champion import champion_decision, plan_aliases, registered_model_of, reuse_line
from cifar_rounds.analysis.criteria import (
    criteria,
    decision_alpha,
    missing_seeds,
    passes,
    planned_round,
    planned_seeds,
    policy_lines,
    seeds_line,
)
from cifar_rounds.analysis.registry_state import RegistryState, comparison_key
from cifar_rounds.analysis.replicates import Replicate, Round, one_per_run
from cifar_rounds.analysis.report import round_verdict, verdict_sentences
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import with_overrides
from cifar_rounds.tracking.registry import CHAMPION, round_alias

from helpers import repo_params

N = 2000  # test images
NAMES = ("a", "b")


def replicate(label, accuracy=0.5, val=0.5, seed=0, params=None, correct=None, run_id=None):
    """A replicate whose test predictions are right on a random `accuracy` share of the images."""
    if correct is None:
        correct = np.random.default_rng(seed).random(N) < accuracy
    metrics = {
        "mlflow_run_id": run_id or f"id-{label}",
        "val_accuracy": val,
        "test_accuracy": float(correct.mean()),
        "train_accuracy": float(correct.mean()),
        "test_set_digest": "0123456789abcdef",
    }
    predictions = [("cat", "cat" if c else "dog") for c in correct]
    return Replicate(label, params or repo_params(), metrics, [{"epoch": 1.0, "val_loss": 1.0}], predictions)


def round_of(name, accuracy, seeds=3, params=None):
    return Round(
        name,
        [
            replicate(f"{name}-s{s}", accuracy, 0.5 + s / 100, 10 * sum(map(ord, name)) + s, params)
            for s in range(seeds)
        ],
    )


def planned(n):
    """The repository's params with `tracking.planned_seeds` recorded (whether or not Params declares it yet)."""
    params = repo_params()
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"planned_seeds": n})})


def verdict(difference=0.02, p=0.01, seeds=3):
    base, cand = round_of("a", 0.5), round_of("b", 0.5)
    v = round_verdict(base, cand, 0.05)
    return dataclasses.replace(
        v, difference=difference, p_value=p, real=p < 0.05, seeds_baseline=seeds, seeds_candidate=seeds
    )


def registry(*rounds, deleted=(), unregistered=(), aliases=None, deleted_champion=None, decisions=0):
    runs = [rep.metrics["mlflow_run_id"] for r in rounds for rep in r.replicates]
    versions = {
        run: ModelVersion("m", str(i + 1), 0, run_id=run)
        for i, run in enumerate(runs)
        if run not in {*deleted, *unregistered}
    }
    held = {round_alias(r.name): None for r in rounds} | {CHAMPION: None}
    held |= {alias: versions[run] for alias, run in (aliases or {}).items()}
    return RegistryState("m", True, versions, frozenset(deleted), held, deleted_champion, decisions, "0123456789abcdef")


def champion_line(plan):
    return next(line for line in plan.lines if line.startswith("- @champion"))


def test_with_no_champion_the_baseline_is_the_incumbent_and_better_round_is_said_only_when_significant():
    worse = verdict(difference=-0.011, p=0.00044)  # the candidate is significantly worse
    assert champion_decision("none", (True, True), worse, NAMES).holder == "baseline"
    assert champion_decision("none", (False, True), worse, NAMES).holder is None  # never the worse one
    unclear = verdict(difference=0.004, p=0.3)  # better by the mean, not by the verdict
    d = champion_decision("none", (True, True), unclear, NAMES)
    assert d.holder == "baseline" and "better round" not in d.why and "does not say b beats a" in d.why, d.why
    assert champion_decision("none", (False, True), unclear, NAMES).holder is None  # the candidate must beat it
    assert champion_decision("none", (True, False), unclear, NAMES).holder == "baseline"
    better = verdict(difference=0.02, p=0.01)
    taken = champion_decision("none", (True, True), better, NAMES)
    assert taken.holder == "candidate" and "b passes the success criteria and its configuration beats a" in taken.why
    assert champion_decision("none", (False, True), better, NAMES).holder == "candidate"
    # end to end on measured rounds: a candidate 5 points worse over 3 seeds each
    base, cand = round_of("a", 0.55), round_of("b", 0.50)
    v = round_verdict(base, cand, 0.05)
    assert v.real and v.difference < 0
    plan = plan_aliases(registry(base, cand), base, cand, (True, True), v)
    best_a = plan.moves[0][1]
    assert plan.moves[-1] == (CHAMPION, best_a) and "there was no champion; a takes it" in champion_line(plan)


def test_a_challenger_takes_the_champion_only_when_it_passes_and_its_configuration_is_better():
    better, worse, unclear = verdict(), verdict(difference=-0.02), verdict(p=0.2)
    assert champion_decision("baseline", (True, True), better, NAMES).holder == "candidate"
    assert champion_decision("candidate", (True, True), worse, NAMES).holder == "baseline"  # either side challenges
    for side, ok, v, why in (
        ("baseline", (True, False), better, "b does not pass the success criteria"),
        ("baseline", (True, True), unclear, "does not say b beats a, the champion's round (difference +2.00%"),
        ("candidate", (True, True), better, "does not say a beats b"),
    ):
        d = champion_decision(side, ok, v, NAMES)
        assert d.holder == side and why in d.why, d.why
    other = champion_decision("other", (True, True), better, NAMES)
    assert other.holder is None and "neither a nor b" in other.why and not other.tested


def test_champion_moves_only_with_three_distinct_seeds_per_side():
    two = champion_decision("none", (True, True), verdict(seeds=2), NAMES)
    assert two.holder is None and "3 or more distinct seeds per side (a: 2, b: 2)" in two.why and not two.tested
    assert champion_decision("baseline", (True, True), verdict(seeds=2), NAMES).holder is None
    assert champion_decision("none", (True, True), verdict(seeds=3), NAMES).holder == "candidate"
    assert "0.057 to 0.062 at alpha 0.05" in " ".join(policy_lines(repo_params().report, (round_of("a", 0.5),) * 2))


def test_a_run_given_twice_is_one_replicate_and_identical_replicates_are_one_seed():
    once = replicate("x")
    given = one_per_run("x,x", [once, once])
    assert given.replicates == [once] and given.repeated == ("x",)
    assert "given again and counted once: x" in seeds_line(given)
    same = np.random.default_rng(5).random(N) < 0.6  # three runs, one trained model
    base = Round("a", [replicate(f"a-s{s}", correct=same, val=0.5 + s / 100) for s in range(3)])
    cand = round_of("b", 0.5)
    assert len(base.distinct) == 1 and "2 with test predictions identical to another's, so 1 distinct" in seeds_line(
        base
    )
    v = round_verdict(base, cand, 0.05)
    assert v.seeds_baseline == 1  # one seed, for the verdict as for the decision
    plan = plan_aliases(registry(base, cand), base, cand, (True, True), v)
    assert CHAMPION not in dict(plan.moves) and "(a: 1, b: 3)" in champion_line(plan)


def test_aliases_wait_until_both_rounds_have_their_planned_seeds():
    base, cand = round_of("a", 0.55, params=planned(3)), round_of("b", 0.50, params=planned(5))
    v = round_verdict(base, cand, 0.05)
    plan = plan_aliases(registry(base, cand), base, cand, (True, True), v)
    assert plan.moves == [] and plan.lines == [
        "- no alias moves until both rounds have their planned seeds (missing: b 2)"
    ]
    assert seeds_line(cand) == "- b: seeds 3 of 5 planned (2 missing)"
    unplanned = round_of("b", 0.50)
    assert seeds_line(unplanned) == "- b: seeds 3, no plan recorded (decided as if 3 were planned)"
    assert plan_aliases(registry(base, unplanned), base, unplanned, (True, True), v).moves


def test_a_rounds_version_is_its_best_seed_by_validation_and_the_test_sets_comparisons_are_counted():
    high_test = replicate("a-s0", accuracy=0.9, val=0.60, seed=1)
    high_val = replicate("a-s1", accuracy=0.4, val=0.70, seed=2)
    base, cand = Round("a", [high_test, high_val, replicate("a-s2", 0.5, 0.65, seed=3)]), round_of("b", 0.5)
    state = registry(base, cand, decisions=4)
    v = round_verdict(base, cand, decision_alpha(0.05, state.earlier("a", "b")))
    plan = plan_aliases(state, base, cand, (True, True), v)
    assert plan.moves[0] == ("a", state.versions["id-a-s1"]) and plan.lines[0].startswith("- @a -> version 2 (a-s1, ")
    assert plan.tested and v.alpha == 0.05 / 32  # the fifth comparison on this test set
    line = reuse_line(state, base, cand, v, applied=True)
    assert "has decided 5 comparison(s) of m; this one is comparison 5 on it" in line and "0.0015625" in line
    assert "has decided 4 comparison(s) of m;" in reuse_line(state, base, cand, v, False)
    again = dataclasses.replace(state, comparisons={comparison_key("b", "a"): 1})  # decided before, as second
    assert again.earlier("a", "b") == 1 and "spends nothing more" in reuse_line(again, base, cand, v, True)


def test_the_decision_reads_the_plan_fixed_by_the_first_plan_of_three_or_more_seeds():
    def with_plan(r, plans):
        reps = [
            dataclasses.replace(rep, params=with_overrides(planned(n), {"train.seed": s}))
            for s, (rep, n) in enumerate(zip(r.replicates, plans))
        ]
        return Round(r.name, reps)

    pilot_then_advice = with_plan(round_of("a", 0.5, seeds=6), [2, 2, 6, 6, 6, 6])
    assert planned_seeds(pilot_then_advice) == 6 and len(planned_round(pilot_then_advice).replicates) == 6
    peeked = with_plan(round_of("b", 0.5, seeds=5), [3, 3, 3, 4, 5])  # --seeds 4, then 5, after --seeds 3
    assert planned_seeds(peeked) == 3
    assert [rep.label for rep in planned_round(peeked).replicates] == ["b-s0", "b-s1", "b-s2"]
    assert missing_seeds(peeked) == 0 and "the decision reads the 3 of its plan" in seeds_line(peeked)
    assert [decision_alpha(0.05, k) for k in range(3)] == [0.025, 0.0125, 0.00625]


def test_the_decision_uses_the_workspaces_thresholds_not_the_rounds_own():
    lax = with_overrides(repo_params(), {"report.min_test_accuracy": 0.0, "report.max_train_test_gap": 1.0})
    cand = round_of("b", 0.5, params=lax)
    workspace = repo_params().report  # test accuracy must exceed 88%
    assert not passes(cand, workspace) and passes(cand, lax.report)
    assert criteria(cand, workspace)[0][0] == "test accuracy > 88.00%"
    lines = policy_lines(workspace, (round_of("a", 0.5), cand))
    assert "alpha (significance of the verdict): 0.05" in lines[1] and lines[-1] == (
        "- b ran with other `report:` values; they are not used"
    )


def test_one_seed_is_worded_as_two_trained_models_that_differ_on_these_images():
    base, cand = round_of("a", 0.5, seeds=1), round_of("b", 0.6, seeds=1)
    v = round_verdict(base, cand, 0.05)
    first = verdict_sentences(v, base, cand)[0]
    assert v.real and "the trained models a-s0 and b-s0 differ on these test images" in first
    assert "change from" not in first
    same = verdict_sentences(round_verdict(base, base, 0.05), base, base)[0]
    assert "do not differ distinguishably on these test images" in same
    three = verdict_sentences(round_verdict(round_of("a", 0.5), round_of("b", 0.6), 0.05), base, cand)[0]
    assert "the configuration change from a to b is real" in three


def test_rounds_registered_under_different_registered_models_are_refused():
    other = with_overrides(repo_params(), {"tracking.registered_model": "other-model"})
    with pytest.raises(
        StageError, match="different registered models .*a under cifar-rounds-resnet18; b under other-model"
    ):
        registered_model_of(round_of("a", 0.5), round_of("b", 0.5, params=other))
    assert registered_model_of(round_of("a", 0.5), round_of("b", 0.5)) == "cifar-rounds-resnet18"


def test_a_deleted_version_gives_way_to_the_next_seed_and_a_deleted_champion_is_named():
    base, cand = round_of("a", 0.5), round_of("b", 0.55)  # b-s2 has the best validation accuracy
    state = registry(base, cand, deleted={"id-b-s2"}, unregistered={"id-a-s2"}, deleted_champion=("6", "id-b-s2"))
    plan = plan_aliases(state, base, cand, (True, True), verdict(p=0.3))
    lines = "\n".join(plan.lines)
    assert (
        "- @b -> version 5 (b-s1, validation accuracy 51.00%; better by validation, but b-s2's version was deleted)"
        in lines
    )
    assert "a-s2 registered no version" in lines
    # the champion came from b (recorded), and follows b's best seed that still has a version
    assert dict(plan.moves)[CHAMPION] is state.versions["id-b-s1"]
    assert champion_line(plan).startswith(
        "- @champion -> version 5 (was no version (version 6 was the champion and has been deleted)): "
    )


def test_the_report_gives_the_seed_advice_once_with_the_verdict():
    for seeds in (1, 3):
        base, cand = round_of("a", 0.5, seeds=seeds), round_of("b", 0.52, seeds=seeds)
        v = round_verdict(base, cand, 0.05)
        text = " ".join(verdict_sentences(v, base, cand))
        assert v.seed_advice and text.count(v.seed_advice) == 1, text


def test_the_criteria_interval_covers_the_test_images_as_well_as_the_seeds():
    from cifar_rounds.analysis.criteria import spread
    from cifar_rounds.analysis.summary import mean_std

    one = spread(mean_std([0.93]), "{:.2%}", 10_000)  # test-set sampling alone: 1.96 x 0.255 points
    assert one == "93.00% (95% interval over 1 seed(s) and the test images 92.50% to 93.50%)"
    seeds = mean_std([0.925, 0.93, 0.935])
    assert spread(seeds, "{:.2%}", 10_000) != spread(seeds, "{:.2%}")  # wider with the images' term
    assert spread(seeds, "{:.2%}") == "93.00% (95% interval over 3 seed(s) 91.76% to 94.24%)"
