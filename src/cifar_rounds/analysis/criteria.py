"""The decision's policy: success criteria and alpha from one place, the workspace's `report:`; the seed rules.

A round is judged with the thresholds of the workspace's params.yaml, never with its own: a round
run with `-S report.min_test_accuracy=0` is judged like any other. Criteria are means over the
round's distinct replicates (bit-identical ones are one seed). The seed rules: @champion needs
`MIN_CHAMPION_SEEDS` distinct seeds per side, and aliases wait for the round's plan, the first
`rounds run --seeds N` with N >= MIN_CHAMPION_SEEDS (`tracking.planned_seeds`). The decision reads
the plan's seeds only, so a later, larger --seeds adds figures, never another look at the decision.
Each comparison decided on one test set spends its own share of alpha (`decision_alpha`).
"""

from __future__ import annotations

import math

from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.summary import MeanStd, mean_std
from cifar_rounds.analysis.verdict import Z95, t_quantile
from cifar_rounds.core.params import ReportParams

# Distinct seeds per side before @champion moves. With 2 the configuration verdict is slightly
# liberal when configurations differ image by image: its A/A false-positive rate is 0.057 to 0.062 at
# alpha 0.05 (issue 23's simulation); with 3 or more it stays at or below alpha.
MIN_CHAMPION_SEEDS = 3


def values(r: Round, key: str) -> list[float]:
    return [rep.metrics[key] for rep in r.replicates if key in rep.metrics]


def val_loss_minimum(rep: Replicate) -> tuple[int, float]:
    best = min(rep.history, key=lambda row: row["val_loss"])
    return int(best["epoch"]), best["val_loss"]


def spread(m: MeanStd, fmt: str, images: int = 0) -> str:
    """The mean, with its 95% interval: over the seeds (t, with two or more) and, for a test-set measure
    (`images` > 0), over the test images too (binomial, p(1-p)/images, beside an absolute threshold it matters
    as much as the seeds: a standard error of about 0.26 points at 93% on 10,000 images)."""
    images_var = m.mean * (1 - m.mean) / images if images else 0.0
    seeds_var = m.std**2 / m.n if m.n >= 2 else 0.0
    if seeds_var + images_var == 0:
        return fmt.format(m.mean)
    quantile = t_quantile(0.975, m.n - 1) if m.n >= 2 else Z95
    half = quantile * math.sqrt(seeds_var + images_var)
    over = " and the test images" if images else ""
    low, high = fmt.format(m.mean - half), fmt.format(m.mean + half)
    return f"{fmt.format(m.mean)} (95% interval over {m.n} seed(s){over} {low} to {high})"


def criteria(r: Round, rp: ReportParams) -> list[tuple[str, str, bool]]:
    """(criterion, measured, passed), judged on the mean over the round's distinct seeds with thresholds `rp`."""
    reps = r.distinct
    images = len(reps[0].predictions)  # the test set's size
    test = mean_std([rep.metrics["test_accuracy"] for rep in reps])
    gap = mean_std([rep.metrics["train_accuracy"] - rep.metrics["test_accuracy"] for rep in reps])
    rise = mean_std([rep.history[-1]["val_loss"] / val_loss_minimum(rep)[1] - 1 for rep in reps])
    return [
        (
            f"test accuracy > {rp.min_test_accuracy:.2%}",
            spread(test, "{:.2%}", images),
            test.mean > rp.min_test_accuracy,
        ),
        (f"train-test gap < {rp.max_train_test_gap:.2%}", spread(gap, "{:.2%}"), gap.mean < rp.max_train_test_gap),
        (
            f"stable validation loss: final at most {rp.max_val_loss_rise:.0%} above its minimum",
            spread(rise, "{:+.1%}"),
            rise.mean <= rp.max_val_loss_rise,
        ),
    ]


def passes(r: Round, rp: ReportParams) -> bool:
    return all(ok for _, _, ok in criteria(r, rp))


def policy_lines(rp: ReportParams, rounds: tuple[Round, Round]) -> list[str]:
    """The thresholds, alpha and seed counts that decide, and the rounds that ran with other `report:` values."""
    lines = [
        f"- success criteria: test accuracy > {rp.min_test_accuracy:.2%}, train-test gap < "
        f"{rp.max_train_test_gap:.2%}, final validation loss at most {rp.max_val_loss_rise:.0%} above its minimum",
        f"- alpha (significance of the verdict): {rp.significance:g} for all the comparisons decided on one test "
        f"set together: the first spends {decision_alpha(rp.significance, 0):g}, each later one half of what is "
        "left, so @champion moves falsely at most alpha of the time however many candidates challenge it",
        f"- seeds: @champion moves only with at least {MIN_CHAMPION_SEEDS} distinct seeds per side (at 2 the "
        "verdict is slightly liberal: a false-positive rate of 0.057 to 0.062 at alpha 0.05), and aliases move "
        f"only once both rounds have their planned seeds; the decision reads the plan (the first --seeds N of "
        f"{MIN_CHAMPION_SEEDS} or more, after a pilot of 2 if any), so seeds added later never reopen it",
    ]
    for r in rounds:
        if any(rep.params.report != rp for rep in r.replicates):
            lines.append(f"- {r.name} ran with other `report:` values; they are not used")
    return lines


def planned_seeds(r: Round) -> int | None:
    """The round's plan: the smallest `rounds run --seeds N` recorded with N >= MIN_CHAMPION_SEEDS (a smaller
    one is a pilot, whose advice sets the plan); else the largest recorded; None: no plan recorded."""
    # getattr: runs from before tracking.planned_seeds existed have no such field
    plans = [p for rep in r.replicates if (p := getattr(rep.params.tracking, "planned_seeds", None)) is not None]
    return min((p for p in plans if p >= MIN_CHAMPION_SEEDS), default=max(plans, default=None))


def planned_round(r: Round) -> Round:
    """The round as the decision reads it: the seeds of its plan (train.seed below the plan), however many more
    ran later; the whole round when no plan is recorded."""
    planned = planned_seeds(r)
    if planned is None:
        return r
    return Round(r.name, [rep for rep in r.replicates if rep.params.train.seed < planned], r.repeated)


def decision_alpha(alpha: float, earlier: int) -> float:
    """The share of `alpha` the comparison decided after `earlier` others on the same test set spends: alpha/2,
    alpha/4, ...; the shares sum to alpha however many comparisons follow, so every false @champion move
    among them together stays within alpha (a union bound)."""
    return alpha / 2 ** (earlier + 1)


def missing_seeds(r: Round) -> int:
    planned = planned_seeds(r)
    return max(0, planned - len(planned_round(r).replicates)) if planned else 0


def seeds_line(r: Round) -> str:
    planned, runs, distinct = planned_seeds(r), len(r.replicates), len(r.distinct)
    if not planned:
        plan = f"{runs}, no plan recorded (decided as if {runs} were planned)"
    elif runs > len(planned_round(r).replicates):
        plan = f"{runs}; the decision reads the {planned} of its plan, the others inform the figures only"
    else:
        plan = f"{runs} of {planned} planned ({missing_seeds(r)} missing)"
    same = (
        f"; {runs - distinct} with test predictions identical to another's, so {distinct} distinct"
        if distinct < runs
        else ""
    )
    again = f"; given again and counted once: {', '.join(r.repeated)}" if r.repeated else ""
    return f"- {r.name}: seeds {plan}{same}{again}"
