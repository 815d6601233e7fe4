"""The decision's policy: success criteria and alpha from one place, the workspace's `report:`; the seed rules.

A round is judged with the thresholds of the workspace's params.yaml, never with its own: a round
run with `-S report.min_test_accuracy=0` is judged like any other. Criteria are means over the
round's distinct replicates (bit-identical ones are one seed). The seed rules: aliases wait for
the seeds `rounds run --seeds N` planned (`tracking.planned_seeds`), and @champion needs
`MIN_CHAMPION_SEEDS` distinct seeds per side.
"""

from __future__ import annotations

import math

from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.summary import MeanStd, mean_std
from cifar_rounds.analysis.verdict import t_quantile
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


def spread(m: MeanStd, fmt: str) -> str:
    """The mean, and with two or more seeds its 95% t interval over seeds."""
    if m.n < 2:
        return fmt.format(m.mean)
    half = t_quantile(0.975, m.n - 1) * m.std / math.sqrt(m.n)
    low, high = fmt.format(m.mean - half), fmt.format(m.mean + half)
    return f"{fmt.format(m.mean)} (95% interval over {m.n} seeds {low} to {high})"


def criteria(r: Round, rp: ReportParams) -> list[tuple[str, str, bool]]:
    """(criterion, measured, passed), judged on the mean over the round's distinct seeds with thresholds `rp`."""
    reps = r.distinct
    test = mean_std([rep.metrics["test_accuracy"] for rep in reps])
    gap = mean_std([rep.metrics["train_accuracy"] - rep.metrics["test_accuracy"] for rep in reps])
    rise = mean_std([rep.history[-1]["val_loss"] / val_loss_minimum(rep)[1] - 1 for rep in reps])
    return [
        (f"test accuracy > {rp.min_test_accuracy:.2%}", spread(test, "{:.2%}"), test.mean > rp.min_test_accuracy),
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
        f"- alpha (significance of the verdict): {rp.significance:g}",
        f"- seeds: @champion moves only with at least {MIN_CHAMPION_SEEDS} distinct seeds per side (at 2 the "
        "verdict is slightly liberal: a false-positive rate of 0.057 to 0.062 at alpha 0.05), and aliases move "
        "only once both rounds have all their planned seeds",
    ]
    for r in rounds:
        if any(rep.params.report != rp for rep in r.replicates):
            lines.append(f"- {r.name} ran with other `report:` values; they are not used")
    return lines


def planned_seeds(r: Round) -> int | None:
    """The seeds `rounds run --seeds N` planned for the round (the largest recorded); None: no plan recorded."""
    # getattr: runs from before tracking.planned_seeds existed have no such field
    plans = [p for rep in r.replicates if (p := getattr(rep.params.tracking, "planned_seeds", None)) is not None]
    return max(plans, default=None)


def missing_seeds(r: Round) -> int:
    planned = planned_seeds(r)
    return max(0, planned - len(r.replicates)) if planned else 0


def seeds_line(r: Round) -> str:
    planned, runs, distinct = planned_seeds(r), len(r.replicates), len(r.distinct)
    plan = (
        f"{runs} of {planned} planned ({missing_seeds(r)} missing)"
        if planned
        else f"{runs}, no plan recorded (decided as if {runs} were planned)"
    )
    same = (
        f"; {runs - distinct} with test predictions identical to another's, so {distinct} distinct"
        if distinct < runs
        else ""
    )
    again = f"; given again and counted once: {', '.join(r.repeated)}" if r.repeated else ""
    return f"- {r.name}: seeds {plan}{same}{again}"
