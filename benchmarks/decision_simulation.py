"""The whole decision in simulation: the report run as seeds arrive, and @champion moved by the rules.

    python benchmarks/decision_simulation.py [--pairs 2000] [--gain-pairs 1000] [--images 10000]

A user has a champion from round A and runs a candidate round B. Both rounds' seeds
arrive together; after each (2, 3, 4, ... per side) the user runs the report, whose
verdict is `cifar_rounds.analysis.verdict.compare_configs` on the seeds so far. The
first report (2 + 2 seeds) recommends the seeds per side for a 1-point gain (its
`recommended_seeds`: the upper confidence bound of the seed std and this
comparison's test-image term); that is the planned N (at least MIN_SEEDS), and the
seeds keep arriving up to N. At every look, `champion_moves` (the rule below)
decides whether @champion moves to B, through the report's own
`champion_decision`; once moved it stays.

The rounds are simulated with the probit model of benchmarks/verdict_model.py
(accuracy 93%, churn 5%, seed std 0.25 points on 10,000 images), with per-image
configuration differences: the configurations disagree on --ratios times as many
images as two seeds of one do (1: none, they share every image's difficulty).
A/A: equal population accuracy (a move is a false champion move). Gain: B's
population accuracy is 1 point higher (a move is the power). Beside the rule, the
same looks under the rule it replaces (move whenever the verdict fires with two or
more seeds per side) show what the rules are for. One process, about 2 CPU-minutes
with the defaults.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass
from datetime import date
from typing import Literal

import numpy as np
from verdict_model import Model, design_for_seed_std, replicates, sigma_d_for, test_sets

from cifar_rounds.analysis.champion import champion_decision
from cifar_rounds.analysis.verdict import Verdict, compare_configs

MIN_SEEDS = 3  # per side before @champion moves: with 2, the verdict is slightly liberal under per-image differences
FIRST_LOOK = 2  # seeds per side at the first report
Side = Literal["none", "baseline", "candidate", "other"]  # where the champion comes from, as in analysis.champion


def champion_moves(side: Side, v: Verdict, planned: int) -> bool:
    """Does @champion move to the candidate's best version? The report's own rule, both rounds passing their
    criteria: no alias moves before both rounds have their planned seeds (as analysis.champion.plan_aliases
    waits), then analysis.champion.champion_decision itself (3 or more seeds per side, never to a round the
    verdict calls worse, with the champion in the baseline round only when the candidate's configuration beats it).
    """
    if min(v.seeds_baseline, v.seeds_candidate) < planned:
        return False
    return champion_decision(side, (True, True), v, ("a", "b")).holder == "candidate"


def fires(v: Verdict) -> bool:
    """The rule this replaces: move whenever the verdict says the candidate is better, two or more seeds per side."""
    return min(v.seeds_baseline, v.seeds_candidate) >= 2 and v.real and v.difference > 0


@dataclass
class Outcome:
    planned: int | None  # None: the first report recommended more than --max-seeds (or none reaches the power)
    moved: bool  # by champion_moves
    fired: bool  # by the rule it replaces


def one_pair(rng, model: Model, gain: float, sigma_d: float, n: int, alpha: float, max_seeds: int) -> Outcome:
    """A baseline and a candidate round on one fresh test set, looked at as their seeds arrive."""
    margin, other = test_sets(rng, model, gain, sigma_d, 1, n)
    a = replicates(rng, margin, model.sigma_g, FIRST_LOOK, model.cutoff)[0]
    b = replicates(rng, other, model.sigma_g, FIRST_LOOK, model.cutoff)[0]
    first = compare_configs(a, b, alpha, target_gain=0.01)
    planned = first.recommended_seeds and max(first.recommended_seeds, MIN_SEEDS)
    moved, fired = champion_moves("baseline", first, planned or math.inf), fires(first)
    if planned is None or planned > max_seeds:
        return Outcome(None, moved, fired)  # the user cannot run the plan; the seeds stop at the first look
    for _ in range(FIRST_LOOK, planned):
        a = np.concatenate([a, replicates(rng, margin, model.sigma_g, 1, model.cutoff)[0]])
        b = np.concatenate([b, replicates(rng, other, model.sigma_g, 1, model.cutoff)[0]])
        v = compare_configs(a, b, alpha, target_gain=0.01)
        moved = moved or champion_moves("baseline", v, planned)
        fired = fired or fires(v)
    return Outcome(planned, moved, fired)


def rate(hits: int, count: int) -> str:
    p = hits / count
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / count):.3f}"


def scenario_line(where: str, name: str, outcomes: list[Outcome], bound: float | None) -> str:
    count = len(outcomes)
    planned = [o.planned for o in outcomes if o.planned is not None]
    moved, fired = sum(o.moved for o in outcomes), sum(o.fired for o in outcomes)
    within = "" if bound is None else (" (within)" if moved / count <= bound else " (NOT within)")
    spread = f"{np.mean(planned):.1f} ({min(planned)} to {max(planned)})" if planned else "none"
    return (
        f"| {where} | {name} | {count} | {spread} | {count - len(planned)} | {rate(moved, count)}{within} | "
        f"{rate(fired, count)} |"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2500, help="A/A pairs of rounds per --ratios value")
    p.add_argument("--gain-pairs", type=int, default=600, help="pairs with a 1-point true gain per --ratios value")
    p.add_argument("--images", type=int, default=10_000, help="test images (CIFAR-10: 10,000)")
    p.add_argument("--accuracy", type=float, default=0.93, help="baseline's population accuracy (fraction)")
    p.add_argument("--churn", type=float, default=0.05, help="share of test images two seeds disagree on")
    p.add_argument("--seed-std", type=float, default=0.25, help="seed std of test accuracy (points)")
    p.add_argument(
        "--ratios",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[1.0, 1.5, 2.0],
        help="the configurations disagree on this x the seeds' churn (1: they share every image's difficulty)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict")
    p.add_argument("--max-seeds", type=int, default=20, help="the most seeds per side a user runs")
    p.add_argument("--cutoff", type=float, default=4.0, help="latent margin beyond which an image is fixed")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole simulation")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    model = design_for_seed_std(args.accuracy, args.churn, args.seed_std / 100, args.images, args.cutoff)
    bound = args.alpha + 3 * math.sqrt(args.alpha * (1 - args.alpha) / args.pairs)
    run = (args.images, args.alpha, args.max_seeds)
    lines = [
        "| configurations disagree on (x the seeds' churn) | scenario | pairs | planned seeds per side: mean (range) | "
        "plan beyond --max-seeds | @champion moved (champion_moves) | moved by the old rule (fires at any look) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio, seed in zip(args.ratios, np.random.SeedSequence(args.seed).spawn(len(args.ratios))):
        sigma_d = 0.0 if ratio == 1 else sigma_d_for(model, ratio)
        aa_rng, gain_rng = (np.random.default_rng(s) for s in seed.spawn(2))
        aa = [one_pair(aa_rng, model, 0.0, sigma_d, *run) for _ in range(args.pairs)]
        gain = [one_pair(gain_rng, model, 0.01, sigma_d, *run) for _ in range(args.gain_pairs)]
        where = f"{ratio:g} (sigma_d {sigma_d:.2f})"
        lines += [scenario_line(where, "A/A", aa, bound), scenario_line(where, "1 point better", gain, None)]
    head = [
        f"date: {date.today()}  host: {platform.machine()}, 1 process, numpy {np.__version__}, "
        f"{time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU",
        f"model: accuracy {args.accuracy:.1%}, churn {args.churn:.1%}, seed std {args.seed_std:g} points on "
        f"{args.images} images; alpha {args.alpha:g}; at most {args.max_seeds} seeds per side",
        "",
    ]
    print("\n".join(head + lines + ["", f"A/A bound: alpha + 3 SE = {bound:.3f}; power target: 0.8."]))


if __name__ == "__main__":
    main()
