"""Did round B's configuration beat round A's? A verdict that a reseed cannot fake.

Each round is a list of replicates, one per training seed; a replicate is its
per-test-image correctness vector over the same test images in the same order.
The question is about configurations: the estimand is

    delta = E_seed E_image[correct | B] - E_seed E_image[correct | A],

the difference of mean accuracy over the training randomness (initialisation,
batch order, augmentation) and over the image distribution the test set is a
sample of. The estimate is the difference of the rounds' mean test accuracies.

Two or more seeds per side: a Welch-Satterthwaite t test whose variance adds
both sources. Seeds and test images are crossed (every replicate sees every
image), so each round is a two-way random-effects table, seeds x images:

    y[s, i] = mu + a[i] + g[s] + e[s, i]

(image difficulty a, seed's overall skill g, seed-by-image interaction e: which
images a particular model happens to get right). The images are shared by both
rounds, so their effects are paired; the seeds of the two rounds are
independent. Then

    Var(mean_B - mean_A) = Var(b[i] - a[i]) / n                      (test images; b: B's image effects)
                         + sum over rounds of (s_g^2 + s_e^2 / n) / k  (seeds)

and each term has an unbiased moment estimate from the usual mean squares
(Cornfield & Tukey 1956, Ann. Math. Statist. 27:907; Searle, Casella &
McCulloch 1992, "Variance Components", ch. 4): the seed term is the variance of
the per-seed accuracies over k, exactly as in Welch's test on per-seed
accuracies (Welch 1947, Biometrika 34:28); the image term is the variance of
the per-image paired difference over n, less the interaction mean squares
that it also contains (subtracting them avoids counting the interaction
twice). Degrees of freedom: Satterthwaite (1946, Biometrics Bulletin 2:110).
The split of test-set variance into a distribution-wise seed part and
independent per-image errors is the one Jordan (ICLR 2024, "On the variance of
neural network training with respect to test sets and distributions") measures
for CIFAR-10.

Why not a two-level bootstrap over seeds and images: with 2 to 5 seeds per
side, resampling seeds sees only k distinct values, shrinks their variance by
(k - 1) / k and has no small-sample correction, while resampling images as well
counts the interaction twice (Owen 2007, "The pigeonhole bootstrap", Ann. Appl.
Stat. 1:386). The two errors pull opposite ways by amounts that depend on k:
in the benchmark's A/A simulation its false-positive rate is 0.08 with 2 seeds
per side and 0.02 with 5, where this test's is 0.025 and 0.037. The
moment estimate is unbiased (the image term is floored at zero, which can only
widen the interval), carries the t correction, and is deterministic (no
resampling, no random state).

One seed on either side: there is no seed-to-seed spread to measure, so the
verdict falls back to the exact McNemar test (McNemar 1947, Psychometrika
12:153) on two trained models, with the conditional Clopper-Pearson interval
(1934, Biometrika 26:404) that is its dual, and says that a configuration
effect is not established.

Seed counts (a closed form, not a table from the simulation): the power of
this Welch-Satterthwaite test with k seeds per side and equal seed spread, exact
for normally distributed per-seed accuracies (a two-dimensional quadrature over
the two rounds' variance estimates); `benchmarks/seed_verdict.py` checks it
against the simulated verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ALPHA = 0.05  # default significance level of the verdict
# Seed-to-seed std of CIFAR-10 ResNet-18 test accuracy on the 10,000 test images
# (fraction): a few tenths of a point in published runs; used where one seed
# cannot measure it.
DEFAULT_SEED_STD = 0.0025
DEFAULT_TARGET_GAIN = 0.005  # gain (fraction) the seed recommendation is sized for
TARGET_POWER = 0.8
MAX_SEEDS = 100  # beyond this the recommendation says "more than"

_NORMAL = NormalDist()
# Gauss-Legendre nodes of the power integral, over the df-setting variance share and the variance
# scale: 1e-7 against 200 x 400 nodes, for 2 to 100 seeds
_SHARE_NODES, _SCALE_NODES = 16, 64
_LARGE_DF = 1e7  # above this the t distribution is the normal to within 1e-7 (relative)


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
    recommended_seeds: int | None  # per side, for `target_gain` at 80% power; None: more than MAX_SEEDS
    target_gain: float


class VarianceParts(NamedTuple):
    """The estimated variance of the difference of mean accuracies, by source."""

    seeds_baseline: float  # s^2 / k of the baseline's per-seed accuracies
    seeds_candidate: float
    images: float  # paired test-image term, interaction removed, floored at 0
    total: float
    df: float  # Satterthwaite degrees of freedom (inf when total is 0)


class MeanStd(NamedTuple):
    mean: float
    std: float  # sample std (n - 1); NaN below two values
    n: int  # finite values used


# ---------------------------------------------------------------- distributions


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast on this side of the mean; the other side by symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with df (possibly fractional, or inf) degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if df > _LARGE_DF:
        return 2.0 * _NORMAL.cdf(-abs(t))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _t_density(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)  # the power search asks for the same few quantiles over and over
def t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t (Newton from the normal quantile, which lies below it)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level {q} is not in (0, 1)")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    z = _NORMAL.inv_cdf(q)
    if df > _LARGE_DF or q == 0.5:
        return z
    # The two-sided p-value is convex and decreasing in t > 0, so Newton steps from
    # below never overshoot: the iterates rise monotonically to the root, and a
    # step that does not is rounding noise in the p-value.
    target, t = 2.0 * (1.0 - q), z
    for _ in range(500):
        step = (t_pvalue(t, df) - target) / (2.0 * _t_density(t, df))
        if step <= 1e-12 * t:
            break
        t += step
    return t


def beta_quantile(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution: Newton steps, bisection whenever one leaves the bracket."""
    lo, hi, x = 0.0, 1.0, a / (a + b)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    for _ in range(200):
        f = betainc(a, b, x) - q
        lo, hi = (x, hi) if f < 0 else (lo, x)
        density = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        nxt = x - f / density if density > 0 else math.nan
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2
        if abs(nxt - x) <= 1e-14 * x or hi - lo <= 1e-300:
            return nxt
        x = nxt
    return x


# ---------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------- two or more seeds


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
    pooled = math.sqrt(((ka - 1) * parts.seeds_baseline * ka + (kb - 1) * parts.seeds_candidate * kb) / (ka + kb - 2))
    # a zero spread (identical replicates) would recommend 2 seeds for any gain: use the typical spread instead;
    # two significant digits, because the count does not move with the third and the search is then reused
    seed_std = float(f"{pooled:.2g}") if pooled > 0 else DEFAULT_SEED_STD
    caveat = _identical_note(baseline, "the baseline") + _identical_note(candidate, "the candidate")
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
        recommended_seeds(target_gain, seed_std, alpha),
        target_gain,
    )


# ---------------------------------------------------------------- one seed


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
    lo = beta_quantile(tail, c, m - c + 1) if c > 0 else 0.0
    hi = beta_quantile(1 - tail, c + 1, m - c) if c < m else 1.0
    return m * (2 * lo - 1) / n, m * (2 * hi - 1) / n


def one_seed_caveat(seeds_baseline: int, seeds_candidate: int, target_gain: float, alpha: float) -> str:
    sides = " and ".join(s for s, k in (("the baseline", seeds_baseline), ("the candidate", seeds_candidate)) if k == 1)
    first = " (the first replicate of each round is compared)" if max(seeds_baseline, seeds_candidate) > 1 else ""
    needed = recommended_seeds(target_gain, DEFAULT_SEED_STD, alpha)
    run = f"run {needed} seeds per side" if needed else f"run more than {MAX_SEEDS} seeds per side"
    return (
        f"With one seed on {sides}, this compares two trained models, not two configurations{first}: "
        "a configuration effect is not established, because reseeding the same configuration alone moves "
        f"test accuracy by about {100 * DEFAULT_SEED_STD:.2g} points. To detect a gain of "
        f"{100 * target_gain:.2g} points with {TARGET_POWER:.0%} power at alpha {alpha:.2g}, {run}."
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
        one_seed_caveat(ka, kb, target_gain, alpha),
        recommended_seeds(target_gain, DEFAULT_SEED_STD, alpha),
        target_gain,
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


# ---------------------------------------------------------------- seeds to run


@cache
def _legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)  # an eigenvalue problem: worth solving once


@cache
def _scale_nodes(df: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes w and weights x density of W = sqrt(chi2_df / df), over chi2 within ~12 sd."""
    lo = math.sqrt(max(df - 12 * math.sqrt(2 * df), 0.0) / df)
    hi = math.sqrt((df + 20 * math.sqrt(2 * df) + 40) / df)
    x, weights = _legendre(_SCALE_NODES)
    w = lo + (hi - lo) * (x + 1) / 2
    log_f = math.log(2) + (df / 2) * math.log(df / 2) - math.lgamma(df / 2) + (df - 1) * np.log(w) - df * w * w / 2
    return w, (hi - lo) / 2 * weights * np.exp(log_f)


@cache
def _share_nodes(f: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes R and weights x density of R = V1 / (V1 + V2) ~ Beta(f/2, f/2), over R <= 1/2 (doubled by symmetry).

    R = sin^2(theta) removes the endpoint singularity of the density at f = 1.
    """
    x, weights = _legendre(_SHARE_NODES)
    theta = (x + 1) * math.pi / 8  # (0, pi/4): R in (0, 1/2)
    a = f / 2
    log_norm = math.lgamma(2 * a) - 2 * math.lgamma(a)
    density = 2 * np.exp(log_norm) * (np.sin(theta) * np.cos(theta)) ** (2 * a - 1)  # per unit theta
    return np.sin(theta) ** 2, 2 * (math.pi / 8) * weights * density


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.frompyfunc(math.erfc, 1, 1)(-x / math.sqrt(2.0)).astype(np.float64)


@lru_cache(maxsize=4096)
def power(seeds_per_side: int, gain: float, seed_std: float = DEFAULT_SEED_STD, alpha: float = ALPHA) -> float:
    """Power of the verdict's two-sided Welch-Satterthwaite t test, k seeds per side of equal std seed_std.

    Exact for normally distributed per-seed accuracies. With V1, V2 ~ chi2_f (f = k - 1) the two
    rounds' variance estimates, T = (Z + delta) / W where W^2 = (V1 + V2) / 2f and
    delta = gain / (seed_std sqrt(2 / k)); the Satterthwaite df is f / (R^2 + (1 - R)^2) with
    R = V1 / (V1 + V2) ~ Beta(f/2, f/2), independent of V1 + V2. So the power is a two-dimensional
    integral over R (which sets the critical value) and W, done by Gauss-Legendre quadrature. The
    test-image term of the variance is left out: for a uniform gain it is small next to the seed term.
    """
    k = seeds_per_side
    if k < 2:
        return math.nan
    if seed_std <= 0:
        return 1.0 if gain != 0 else alpha
    delta = gain / (seed_std * math.sqrt(2.0 / k))
    share, share_weight = _share_nodes(k - 1)
    crit = np.array([t_quantile(1 - alpha / 2, (k - 1) / (r * r + (1 - r) ** 2)) for r in share])
    w, w_weight = _scale_nodes(2.0 * (k - 1))
    cw = crit[:, None] * w[None, :]
    reject = _normal_cdf(delta - cw) + _normal_cdf(-delta - cw)
    return float(share_weight @ reject @ w_weight)


@lru_cache(maxsize=1024)
def recommended_seeds(
    gain: float,
    seed_std: float = DEFAULT_SEED_STD,
    alpha: float = ALPHA,
    target_power: float = TARGET_POWER,
    max_seeds: int = MAX_SEEDS,
) -> int | None:
    """Fewest seeds per side that detect `gain` (fraction) with `target_power`; None if more than max_seeds."""
    if gain <= 0 or power(max_seeds, gain, seed_std, alpha) < target_power:
        return None
    lo, hi = 1, max_seeds  # power(lo) < target <= power(hi); power rises with k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power(mid, gain, seed_std, alpha) >= target_power:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------- the performance table


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean and sample std over the finite values (a seed's missing metric does not poison the others)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    return MeanStd(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


def format_mean_std(values: Iterable[float], fmt: str = "{:.2%}") -> str:
    """'93.12% ± 0.21% (n = 5)'; one value: '93.12% (n = 1)'; none: 'not measured'."""
    m = mean_std(values)
    if m.n == 0:
        return "not measured"
    if m.n == 1:
        return f"{fmt.format(m.mean)} (n = 1)"
    return f"{fmt.format(m.mean)} ± {fmt.format(m.std)} (n = {m.n})"
