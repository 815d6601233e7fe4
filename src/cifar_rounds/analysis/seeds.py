"""How many seeds a configuration verdict needs: the power of the verdict's t test, the image term included.

More seeds shrink the seed part of the difference's variance, 2 sigma^2 / k, and never the test-image part, which
this test set fixes; so a gain can be out of reach of any number of seeds. docs/verdict.md derives the power.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import numpy as np
from scipy import special

ALPHA = 0.05  # default significance level of the verdict
# Seed-to-seed std of CIFAR-10 ResNet-18 test accuracy on the 10,000 test images
# (fraction): a few tenths of a point in published runs; used where one seed
# cannot measure it.
DEFAULT_SEED_STD = 0.0025
DEFAULT_TARGET_GAIN = 0.005  # gain (fraction) the seed recommendation is sized for
TARGET_POWER = 0.8
MAX_SEEDS = 100  # beyond this the recommendation says "more than"
# The seed std a recommendation plans with is this one-sided upper confidence bound of the measured one: with
# 2 + 2 seeds the pooled std is below half its true value 22% of the time, and a plan on it would be underpowered.
STD_CONFIDENCE = 0.8
# how a recommendation plans where one seed per side measures nothing
TYPICAL_PLAN = (
    f"the typical seed std of {100 * DEFAULT_SEED_STD:.2g} points and no test-image term, which one seed per side "
    "cannot measure"
)
# Gauss-Legendre nodes of the power integral over the quantiles of the df-setting variance share and of the
# variance scale: within 2e-5 of 400 x 2000 nodes for 2 to 100 seeds (each power is 1,024 t quantiles)
_SHARE_NODES, _SCALE_NODES = 16, 64


def planning_std(var_baseline: float, seeds_baseline: int, var_candidate: float, seeds_candidate: int) -> float:
    """The seed std a recommendation plans with: the STD_CONFIDENCE upper bound of the pooled per-seed std.

    var_*: the sample variance of each round's per-seed accuracies. Identical replicates measure no spread at all
    (which would recommend 2 seeds for any gain): the typical std stands in. Two significant digits: the count does
    not move with the third, and the power search is then reused.
    """
    df = seeds_baseline + seeds_candidate - 2
    pooled = ((seeds_baseline - 1) * var_baseline + (seeds_candidate - 1) * var_candidate) / df
    if pooled <= 0:
        return DEFAULT_SEED_STD
    upper = math.sqrt(pooled * df / float(special.chdtri(df, STD_CONFIDENCE)))  # chi2_df's lower quantile
    return float(f"{upper:.2g}")


@cache
def _quantile_nodes(f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(R, weights, S, weights): Gauss-Legendre nodes over the quantiles of R ~ Beta(f/2, f/2) and S ~ chi2_2f.

    Integrating over quantiles puts each density into the nodes: E g(X) = integral of g(F^-1(u)) over (0, 1).
    R's half below 1/2 suffices, since the integrand is symmetric in R and 1 - R.
    """
    x, w = special.roots_legendre(_SHARE_NODES)
    share = special.betaincinv(f / 2, f / 2, (x + 1) / 4)
    y, v = special.roots_legendre(_SCALE_NODES)
    scale = 2 * special.gammaincinv(f, (y + 1) / 2)
    return share, w / 2, scale, v / 2


@lru_cache(maxsize=4096)
def power(
    seeds_per_side: int,
    gain: float,
    seed_std: float = DEFAULT_SEED_STD,
    alpha: float = ALPHA,
    image_variance: float = 0.0,
) -> float:
    """Power of the verdict's two-sided t test: k seeds per side of std seed_std, and a test-image term.

    The true variance of the difference is 2 seed_std^2 / k + image_variance; more seeds shrink only the first
    part. Exact for normal per-seed accuracies and an image term known exactly (it is estimated from thousands of
    images). With V1, V2 ~ chi2_f (f = k - 1) the rounds' seed variance estimates, S = V1 + V2 sets the estimated
    variance and R = V1 / S ~ Beta(f/2, f/2), independent of S, sets the Satterthwaite df with it: a
    two-dimensional integral, done by Gauss-Legendre quadrature over their quantiles. docs/verdict.md derives it.
    """
    k = seeds_per_side
    if k < 2:
        return math.nan
    if seed_std <= 0 and image_variance <= 0:
        return 1.0 if gain != 0 else alpha
    f = k - 1
    share, share_weight, scale, scale_weight = _quantile_nodes(f)
    seeds = seed_std**2 * scale / (f * k)  # the estimated seed term at each S node
    estimated = np.broadcast_to(seeds + image_variance, (share.size, seeds.size))
    spread = seeds**2 * (share * share + (1 - share) ** 2)[:, None] / f  # the Satterthwaite denominator
    df = np.divide(estimated**2, spread, out=np.full(spread.shape, np.inf), where=spread > 0)
    crit = special.stdtrit(df, 1 - alpha / 2)  # at an infinite df, the normal quantile
    half = crit * np.sqrt(estimated)
    sd = math.sqrt(2 * seed_std**2 / k + image_variance)
    reject = special.ndtr((gain - half) / sd) + special.ndtr((-gain - half) / sd)
    return float(share_weight @ reject @ scale_weight)


def power_limit(gain: float, image_variance: float, alpha: float = ALPHA) -> float:
    """The power that infinitely many seeds approach: a z test whose variance is the image term alone."""
    if image_variance <= 0:
        return 1.0 if gain != 0 else alpha
    z, shift = float(special.ndtri(1 - alpha / 2)), abs(gain) / math.sqrt(image_variance)
    return float(special.ndtr(shift - z) + special.ndtr(-shift - z))


@lru_cache(maxsize=1024)
def recommended_seeds(
    gain: float,
    seed_std: float = DEFAULT_SEED_STD,
    alpha: float = ALPHA,
    target_power: float = TARGET_POWER,
    max_seeds: int = MAX_SEEDS,
    image_variance: float = 0.0,
) -> int | None:
    """Fewest seeds per side that detect `gain` (fraction) with `target_power`; None if more than max_seeds."""
    if gain <= 0 or power(max_seeds, gain, seed_std, alpha, image_variance) < target_power:
        return None
    lo, hi = 1, max_seeds  # power(lo) < target <= power(hi); power rises with k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power(mid, gain, seed_std, alpha, image_variance) >= target_power:
            hi = mid
        else:
            lo = mid
    return hi


def seed_advice(gain: float, seed_std: float, alpha: float, image_variance: float, planned: str) -> str:
    """One sentence: the seeds per side for `gain`, or that no number of seeds reaches the power on this test set."""
    goal = f"a gain of {100 * gain:.2g} points with {TARGET_POWER:.0%} power at alpha {alpha:.2g}"
    limit = power_limit(gain, image_variance, alpha)
    if limit < TARGET_POWER:
        return (
            f"No number of seeds detects {goal} on this test set: its test-image term (standard error "
            f"{100 * math.sqrt(image_variance):.2g} points), which more seeds do not shrink, caps the power at "
            f"{limit:.0%}; it takes more test images or a larger gain."
        )
    needed = recommended_seeds(gain, seed_std, alpha, image_variance=image_variance)
    run = f"run {needed} seeds per side" if needed else f"run more than {MAX_SEEDS} seeds per side"
    return f"To detect {goal}, {run} (planned with {planned})."
