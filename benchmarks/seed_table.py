"""The README's seed table, with the test-image term: seeds per side for a gain, by how much the configurations
disagree image by image.

    python benchmarks/seed_table.py [--images 10000] [--alpha 0.025]

Two configurations that prefer different images add a paired test-image term to the variance of the
difference of their mean accuracies, which more seeds cannot shrink. It is measured here: on fresh
test sets of the probit model of benchmarks/verdict_model.py (accuracy 93%, churn 5%), 40 seeds
per side, `verdict.difference_variance`'s image term, averaged; then `seeds.recommended_seeds` (80%
power, two-sided) at the alpha the first comparison on a test set spends (`criteria.decision_alpha`:
0.025 of 0.05), for each gain and seed std.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np
from verdict_model import design_for_seed_std, replicates, sigma_d_for, test_sets

from cifar_rounds.analysis.seeds import recommended_seeds
from cifar_rounds.analysis.verdict import difference_variance

GAINS = (0.0025, 0.005, 0.01)
SEED_STDS = (0.002, 0.0025, 0.003)
SEEDS, TEST_SETS = 40, 8


def image_variance(ratio: float, images: int, rng: np.random.Generator) -> float:
    """The mean paired test-image term of two equally accurate configurations disagreeing `ratio` x the churn."""
    model = design_for_seed_std(0.93, 0.05, 0.0025, images, 4.0)
    sigma_d = 0.0 if ratio == 1 else sigma_d_for(model, ratio)
    terms = []
    for _ in range(TEST_SETS):
        margin, other = test_sets(rng, model, 0.0, sigma_d, 1, images)
        a = replicates(rng, margin, model.sigma_g, SEEDS, model.cutoff)[0]
        b = replicates(rng, other, model.sigma_g, SEEDS, model.cutoff)[0]
        terms.append(difference_variance(a, b).images)
    return float(np.mean(terms))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.025, help="the comparison's share of alpha")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    stds = " / ".join(f"{100 * s:g}" for s in SEED_STDS)
    print(f"date: {date.today()}  host: {platform.machine()}, numpy {np.__version__}; alpha {args.alpha:g}\n")
    print(f"| disagreement (x churn) | image term (sd, points) | gain | seeds per side (seed std {stds} points) |")
    print("|---|---|---|---|")
    for ratio in (1.0, 1.5, 2.0):
        term = image_variance(ratio, args.images, rng)
        for gain in GAINS:
            seeds = [recommended_seeds(gain, s, args.alpha, image_variance=term) for s in SEED_STDS]
            shown = " / ".join(str(n) if n else "none" for n in seeds)
            print(f"| {ratio:g} | {100 * np.sqrt(term):.3f} | {100 * gain:g} points | {shown} |")


if __name__ == "__main__":
    main()
