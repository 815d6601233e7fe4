"""Did round B's configuration beat round A's? A verdict that a reseed cannot fake.

Two or more seeds per side: a Welch-Satterthwaite t test on the difference of mean test accuracy whose variance
adds the seeds of both rounds and the paired test-image term. One seed on either side: the exact McNemar test of
two trained models. `power` and `recommended_seeds` size the next round, the image term included. The model, its
sources and the simulations that check it: docs/verdict.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from cifar_rounds.analysis.seeds import (
    ALPHA,
    DEFAULT_SEED_STD,
    DEFAULT_TARGET_GAIN,
    STD_CONFIDENCE,
    TYPICAL_PLAN,
    planning_std,
    recommended_seeds,
    seed_advice,
)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Verdict:
    """Candidate minus baseline mean test accuracy (fractions), with its uncertainty and the decision."""

    difference: float
    low: float  # interval at `level`
    high: float
    level: float
    p_value: float  # two-sided
    alpha: float
    real: bool  # p_value < alpha
    seeds_baseline: int
    seeds_candidate: int
    method: str
    covers: str  # one sentence: which sources of variance the interval and p-value cover
    caveat: str  # sentences the report must print with the verdict ("" when none)
    recommended_seeds: int | None  # per side, for `target_gain` at 80% power; None: more than MAX_SEEDS or never
    target_gain: float
    seed_advice: str = ""  # one sentence: the seeds to run for `target_gain` and what the plan assumed


class VarianceParts(NamedTuple):
    """The estimated variance of the difference of mean accuracies, by source."""

    seeds_baseline: float  # s^2 / k of the baseline's per-seed accuracies
    seeds_candidate: float
    images: float  # paired test-image term, interaction removed, floored at 0
    total: float
    df: float  # Satterthwaite degrees of freedom (inf when total is 0)


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with df (possibly fractional, or inf) degrees of freedom."""
    return 2.0 * float(special.stdtr(df, -abs(t)))


def t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t with df (possibly fractional, or inf) degrees of freedom."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level {q} is not in (0, 1)")
    return float(special.stdtrit(df, q))


def _replicates(replicates: Sequence[ArrayLike], side: str) -> np.ndarray:
    """A round's replicates as a seeds x images float matrix of 0/1, or a ValueError that says what is wrong."""
    if len(replicates) == 0:
        raise ValueError(f"{side}: no replicates")
    rows = [np.asarray(r) for r in replicates]
    if any(r.ndim != 1 for r in rows):
        raise ValueError(f"{side}: each replicate must be a 1-D per-test-image correctness vector")
    if len({r.size for r in rows}) != 1:
        raise ValueError(
            f"{side}: replicates cover different numbers of test images ({sorted({r.size for r in rows})})"
        )
    if rows[0].size == 0:
        raise ValueError(f"{side}: no test images")
    y = np.stack(rows).astype(np.float64)
    if not np.all((y == 0.0) | (y == 1.0)):  # also rejects NaN
        raise ValueError(f"{side}: correctness values must be 0/1 or bool (found NaN or other values)")
    return y


def _round_moments(y: np.ndarray) -> tuple[float, float]:
    """(variance of the per-seed accuracies, interaction mean square) of one round's seeds x images table."""
    k, n = y.shape
    seed_means, image_means = y.mean(axis=1), y.mean(axis=0)
    grand = seed_means.mean()
    resid = y - image_means - seed_means[:, None] + grand
    ms_interaction = float((resid**2).sum()) / ((k - 1) * (n - 1)) if n > 1 else 0.0
    return float(seed_means.var(ddof=1)), ms_interaction


def difference_variance(baseline: np.ndarray, candidate: np.ndarray) -> VarianceParts:
    """Var(mean accuracy difference) over seeds and test images, from two seeds x images 0/1 tables (k >= 2 each)."""
    (ka, n), kb = baseline.shape, candidate.shape[0]
    var_a, ms_a = _round_moments(baseline)
    var_b, ms_b = _round_moments(candidate)
    paired = candidate.mean(axis=0) - baseline.mean(axis=0)
    var_paired = float(paired.var(ddof=1)) if n > 1 else 0.0
    # Var(b - a) / n; the per-image averages also carry each round's interaction / k, removed here
    images = (var_paired - ms_a / ka - ms_b / kb) / n
    terms = [(var_a / ka, ka - 1), (var_b / kb, kb - 1)]
    if images > 0:
        terms += [(var_paired / n, n - 1), (ms_a / (ka * n), (ka - 1) * (n - 1)), (ms_b / (kb * n), (kb - 1) * (n - 1))]
    images = max(images, 0.0)  # a negative moment estimate means "no detectable image term"
    total = var_a / ka + var_b / kb + images
    denominator = sum(v * v / df for v, df in terms if v > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    return VarianceParts(var_a / ka, var_b / kb, images, total, df)


def _t_interval(difference: float, parts: VarianceParts, level: float) -> tuple[float, float, float]:
    """(low, high, two-sided p) of the difference under a t with the Satterthwaite df."""
    se = math.sqrt(parts.total)
    if se == 0.0:  # no spread anywhere: the difference is what it is
        return difference, difference, 1.0 if difference == 0 else 0.0
    half = t_quantile(0.5 + level / 2, parts.df) * se
    return difference - half, difference + half, t_pvalue(difference / se, parts.df)


def covers_seeds_and_images(ka: int, kb: int, n: int) -> str:
    return (
        f"The interval and p-value cover training randomness (the spread between the {ka} and {kb} seeds "
        f"of the two rounds) and test-set sampling (the {n} test images, shared by every replicate, as a "
        "sample of the image distribution); the train/validation split, which all replicates share, is not varied."
    )


def _identical_note(y: np.ndarray, label: str) -> str:
    if np.all(y == y[0]):
        return (
            f"The {y.shape[0]} replicates of {label} are identical: the seeds did not change the trained model, "
            "so training randomness is not sampled for this round. "
        )
    return ""


def seeds_verdict(
    baseline: np.ndarray,
    candidate: np.ndarray,
    alpha: float = ALPHA,
    level: float = 0.95,
    target_gain: float = DEFAULT_TARGET_GAIN,
) -> Verdict:
    """Configuration verdict from k >= 2 seeds per side (seeds x images 0/1 tables over the same images)."""
    (ka, n), kb = baseline.shape, candidate.shape[0]
    difference = float(candidate.mean() - baseline.mean())
    parts = difference_variance(baseline, candidate)
    low, high, p = _t_interval(difference, parts, level)
    seed_std = planning_std(parts.seeds_baseline * ka, ka, parts.seeds_candidate * kb, kb)
    images = float(f"{parts.images:.2g}")  # as the seed std: two digits, so the power search is reused
    caveat = _identical_note(baseline, "the baseline") + _identical_note(candidate, "the candidate")
    planned = (
        f"a seed std of {100 * seed_std:.2g} points (the {STD_CONFIDENCE:.0%} upper confidence bound of the "
        f"{ka} + {kb} seeds' spread) and this comparison's test-image term"
    )
    return Verdict(
        difference,
        low,
        high,
        level,
        p,
        alpha,
        p < alpha,
        ka,
        kb,
        "t test on per-seed accuracies, variance over seeds and test images (Welch-Satterthwaite)",
        covers_seeds_and_images(ka, kb, n),
        caveat.strip(),
        recommended_seeds(target_gain, seed_std, alpha, image_variance=images),
        target_gain,
        seed_advice(target_gain, seed_std, alpha, images, planned),
    )


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b against Bin(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int is correctly rounded, as the exact fraction would be


def mcnemar_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Interval of (c - b) / n given b + c discordant images: Clopper-Pearson on c / (b + c), the exact test's dual."""
    m = b + c
    if m == 0:
        return 0.0, 0.0
    tail = (1 - level) / 2
    lo = float(special.betaincinv(c, m - c + 1, tail)) if c > 0 else 0.0
    hi = float(special.betaincinv(c + 1, m - c, 1 - tail)) if c < m else 1.0
    return m * (2 * lo - 1) / n, m * (2 * hi - 1) / n


def one_seed_caveat(seeds_baseline: int, seeds_candidate: int, advice: str) -> str:
    sides = " and ".join(s for s, k in (("the baseline", seeds_baseline), ("the candidate", seeds_candidate)) if k == 1)
    first = " (the first replicate of each round is compared)" if max(seeds_baseline, seeds_candidate) > 1 else ""
    return (
        f"With one seed on {sides}, this compares two trained models, not two configurations{first}: "
        "a configuration effect is not established, because reseeding the same configuration alone moves "
        f"test accuracy by about {100 * DEFAULT_SEED_STD:.2g} points. {advice}"
    )


def mcnemar_verdict(
    baseline: np.ndarray,
    candidate: np.ndarray,
    alpha: float = ALPHA,
    level: float = 0.95,
    target_gain: float = DEFAULT_TARGET_GAIN,
) -> Verdict:
    """Two-model verdict from the first replicate of each side: exact McNemar on the shared test images."""
    a, c_ = baseline[0].astype(bool), candidate[0].astype(bool)
    b, c = int(np.sum(a & ~c_)), int(np.sum(~a & c_))
    n = a.size
    p = mcnemar_exact(b, c)
    low, high = mcnemar_interval(b, c, n, level)
    ka, kb = baseline.shape[0], candidate.shape[0]
    advice = seed_advice(target_gain, DEFAULT_SEED_STD, alpha, 0.0, TYPICAL_PLAN)
    covers = (
        f"The p-value covers only which of the {n} shared test images each of two trained models gets right; "
        "training randomness is not covered."
    )
    return Verdict(
        (c - b) / n,
        low,
        high,
        level,
        p,
        alpha,
        p < alpha,
        ka,
        kb,
        "exact McNemar test on two trained models",
        covers,
        one_seed_caveat(ka, kb, advice),
        recommended_seeds(target_gain, DEFAULT_SEED_STD, alpha),
        target_gain,
        advice,
    )


def compare_configs(
    baseline: Sequence[ArrayLike],
    candidate: Sequence[ArrayLike],
    alpha: float = ALPHA,
    level: float = 0.95,
    target_gain: float = DEFAULT_TARGET_GAIN,
) -> Verdict:
    """Does the candidate round's configuration beat the baseline's? Replicates: per-seed 0/1 vectors, same images."""
    a, b = _replicates(baseline, "baseline"), _replicates(candidate, "candidate")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the rounds were evaluated on different test sets ({a.shape[1]} vs {b.shape[1]} images)")
    if min(a.shape[0], b.shape[0]) < 2:
        return mcnemar_verdict(a, b, alpha, level, target_gain)
    return seeds_verdict(a, b, alpha, level, target_gain)
