"""The whole @champion decision in A/A simulation: how often it moves the champion to an equal configuration.

    python benchmarks/champion_decision.py [--comparisons 2000] [--images 10000] [--seeds 6]

Two configurations with equal population accuracy that disagree image by image (a probit model:
image i's margin is mu + u_i + d_i, with image difficulty u_i shared and d_i ~ N(0, sigma_d^2)
drawn for each configuration; seed s adds its overall skill g_s ~ N(0, sigma_g^2) and a
per-image perturbation eps_si ~ N(0, 1)). The champion comes from the baseline; the candidate
takes it when `champion.champion_decision` says so (both rounds pass their criteria). Rules:

- peeking (the old report): a report after every new pair of seeds from 2 to --seeds, the champion
  moved at the first that fires, with 2 seeds per side enough;
- at 2 seeds: one decision with 2 seeds per side (the verdict alone; the decision now refuses it);
- planned: one decision once both rounds have their planned --seeds (`plan_aliases` waits for
  them), at least `MIN_CHAMPION_SEEDS` per side.

Prints each rule's false-move rate (a 95% Wilson interval beside it), the measured churn between
two seeds and between the configurations, the seed std, and the power of the planned rule for a
1-point gain. About a minute on one core with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from statistics import NormalDist

import numpy as np

from cifar_rounds.analysis.champion import champion_decision
from cifar_rounds.analysis.criteria import MIN_CHAMPION_SEEDS
from cifar_rounds.analysis.verdict import compare_configs, wilson_interval

NORMAL = NormalDist()
NAMES = ("baseline", "candidate")


def moves(a: np.ndarray, b: np.ndarray, alpha: float, enforce_minimum: bool = True) -> bool:
    """Whether the decision moves the baseline's champion to the candidate on these seeds x images tables."""
    v = compare_configs(a, b, alpha)
    if not enforce_minimum:  # the old rule: any two seeds per side decide
        v = dataclasses.replace(v, seeds_baseline=MIN_CHAMPION_SEEDS, seeds_candidate=MIN_CHAMPION_SEEDS)
    return champion_decision("baseline", (True, True), v, NAMES).holder == "candidate"


def rate(hits: int, count: int) -> str:
    low, high = wilson_interval(hits, count)
    return f"{hits / count:.3f} ({low:.3f} to {high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=2000)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--seeds", type=int, default=6, help="planned seeds per side")
    parser.add_argument("--accuracy", type=float, default=0.95)
    parser.add_argument("--sigma-u", type=float, default=2.0, help="spread of image difficulty (latent units)")
    parser.add_argument("--sigma-d", type=float, default=0.5, help="per-image difference between configurations")
    parser.add_argument("--seed-std", type=float, default=0.0025, help="distribution-wise seed std (fraction)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--rng", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.rng)
    z = NORMAL.inv_cdf(args.accuracy)
    scale = math.sqrt(1 + args.sigma_u**2 + args.sigma_d**2)
    sigma_g = args.seed_std * scale / NORMAL.pdf(z)  # d accuracy / d g, approximately; the measured std is printed
    mu = z * math.sqrt(scale**2 + sigma_g**2)
    k, n = args.seeds, args.images

    def tables(shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        u = rng.normal(0, args.sigma_u, n)
        sides = []
        for extra in (0.0, shift):
            margin = mu + u + rng.normal(0, args.sigma_d, n) + extra
            g = rng.normal(0, sigma_g, (k, 1))
            sides.append(margin + g + rng.standard_normal((k, n)) > 0)
        return sides[0], sides[1]

    peeking = at_two = planned = 0
    seed_churn, config_churn, seed_std = [], [], []
    for _ in range(args.comparisons):
        a, b = tables()
        peeking += any(moves(a[:j], b[:j], args.alpha, enforce_minimum=False) for j in range(2, k + 1))
        at_two += moves(a[:2], b[:2], args.alpha, enforce_minimum=False)
        planned += moves(a, b, args.alpha)
        seed_churn.append(np.mean(a[0] != a[1]))
        config_churn.append(np.mean(a[0] != b[0]))
        seed_std.append(np.std(a.mean(axis=1), ddof=1))
    shift = (NORMAL.inv_cdf(args.accuracy + 0.01) - z) * scale  # about a 1-point gain; the measured one is printed
    powered, gains = 0, []
    for _ in range(args.comparisons // 2):
        a, b = tables(shift)
        powered += moves(a, b, args.alpha)
        gains.append(b.mean() - a.mean())
    count = args.comparisons
    print(
        f"A/A, {count} comparisons, {n} images, accuracy {args.accuracy:.2f}, alpha {args.alpha:g}, "
        "champion in the baseline"
    )
    print(
        f"churn between two seeds {np.mean(seed_churn):.4f}, between the configurations {np.mean(config_churn):.4f}, "
        f"seed std {100 * np.mean(seed_std):.3f} points"
    )
    print("| rule | false champion moves (95% interval) |")
    print("|---|---|")
    print(f"| peeking: a report after each pair of seeds, 2 to {k} per side | {rate(peeking, count)} |")
    print(f"| one decision at 2 seeds per side | {rate(at_two, count)} |")
    print(f"| one decision at the planned {k} seeds per side | {rate(planned, count)} |")
    print(f"power of the planned rule for a gain of {100 * np.mean(gains):.2f} points: {rate(powered, count // 2)}")


if __name__ == "__main__":
    main()
