"""The probit model of per-image correctness that benchmarks/seed_verdict.py and decision_simulation.py share.

Each comparison draws a fresh test set; image i has a latent margin m_i = mu + u_i,
u_i ~ N(0, sigma_u^2) (its difficulty), shared by every replicate of both
configurations. Seed s of a configuration gets image i right when

    m_i + d_i + shift + g_s + eps_si > 0,   g_s ~ N(0, sigma_g^2),   eps_si ~ N(0, 1),

where g_s is the seed's overall skill (the distribution-wise seed effect: it moves
accuracy on every image at once), eps_si the model-specific perturbation of that
image (which images a particular model happens to get right), and, for the
candidate only, d_i ~ N(0, sigma_d^2) the configuration's own per-image
difference (images it finds easier or harder than the baseline does; 0 for the
baseline). sigma_u is set by the churn (the expected share of test images two
seeds disagree on), mu by the accuracy, sigma_g by the distribution-wise part of
the seed std, sigma_d by how many more images the two configurations disagree on
than two seeds of one do; the candidate's shift gives it the stated gain in
population accuracy (0: equal population accuracy, whatever sigma_d). Images with
|margin| > cutoff are not sampled (always right or always wrong: a flip has
probability below 3.2e-5) so only contested images cost random draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import special

NORMAL = NormalDist()
_HERMITE = np.polynomial.hermite_e.hermegauss(150)  # nodes and weights for E over a standard normal


@dataclass(frozen=True)
class Model:
    mu: float  # baseline's mean latent margin
    sigma_u: float  # spread of image difficulty
    sigma_g: float  # spread of the seed's overall skill
    cutoff: float  # margins beyond this are not sampled

    def scale(self, sigma_d: float = 0.0) -> float:
        return math.sqrt(1 + self.sigma_u**2 + sigma_d**2 + self.sigma_g**2)

    def accuracy(self) -> float:
        """The baseline's population accuracy (over images and seeds)."""
        return NORMAL.cdf(self.mu / self.scale())

    def shift_for_gain(self, gain: float, sigma_d: float = 0.0) -> float:
        """The candidate's margin shift that makes its population accuracy the baseline's + gain."""
        return NORMAL.inv_cdf(self.accuracy() + gain) * self.scale(sigma_d) - self.mu


def churn_of(mu: float, sigma_u: float) -> float:
    """Expected share of images two seeds disagree on: 2 E[p (1 - p)], p = P(image right | image)."""
    x, w = _HERMITE
    p = special.ndtr(mu + sigma_u * x)
    return float(2 * np.sum(w * p * (1 - p)) / np.sum(w))


def cross_churn(model: Model, sigma_d: float) -> float:
    """Expected share of images a baseline seed and a candidate seed (equal accuracy) disagree on."""
    x, w = _HERMITE
    shift = model.shift_for_gain(0.0, sigma_d)
    pa = special.ndtr(model.mu + model.sigma_u * x)[:, None]
    pb = special.ndtr(model.mu + shift + model.sigma_u * x[:, None] + sigma_d * x[None, :])
    both = w[:, None] * w[None, :] * (pa * (1 - pb) + pb * (1 - pa))
    return float(both.sum() / w.sum() ** 2)


def sigma_d_for(model: Model, ratio: float) -> float:
    """The per-image configuration spread at which the configurations disagree on `ratio` x the seeds' churn."""
    target = ratio * churn_of(model.mu, model.sigma_u)
    lo, hi = 0.0, 50.0  # cross churn rises with sigma_d
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cross_churn(model, mid) < target else (lo, mid)
    return (lo + hi) / 2


def design(accuracy: float, churn: float, dist_std: float, cutoff: float) -> Model:
    """The model with this accuracy, churn and distribution-wise seed std (fractions)."""
    z = NORMAL.inv_cdf(accuracy)
    lo, hi = 1e-3, 100.0  # churn falls as image difficulty spreads out
    for _ in range(100):
        sigma_u = math.sqrt(lo * hi)
        lo, hi = (sigma_u, hi) if churn_of(z * math.sqrt(1 + sigma_u**2), sigma_u) > churn else (lo, sigma_u)
    scale = math.sqrt(1 + sigma_u**2)
    sigma_g = dist_std * scale / NORMAL.pdf(z)  # d accuracy / d g = pdf(z) / scale, linear in the small g
    return Model(z * math.sqrt(scale**2 + sigma_g**2), sigma_u, sigma_g, cutoff)


def design_for_seed_std(accuracy: float, churn: float, seed_std: float, images: int, cutoff: float) -> Model:
    """The model whose seed std on `images` test images is seed_std: per-image flips plus the distribution-wise part."""
    per_image = churn / (2 * images)  # variance of a seed's accuracy from independent per-image flips
    if seed_std**2 < per_image:
        raise SystemExit(f"--seed-std below the per-image part alone ({100 * math.sqrt(per_image):.3f} points)")
    return design(accuracy, churn, math.sqrt(seed_std**2 - per_image), cutoff)


def dropped_share(model: Model) -> float:
    """Share of the per-image Bernoulli variance carried by images beyond the cutoff."""
    x, w = _HERMITE
    m = model.mu + model.sigma_u * x
    v = w * special.ndtr(m) * (1 - special.ndtr(m))
    return float(np.sum(v[np.abs(m) > model.cutoff]) / np.sum(v))


def replicates(rng: np.random.Generator, margin: np.ndarray, sigma_g: float, k: int, cutoff: float) -> np.ndarray:
    """(comparisons, k, images) bool: which images each seed gets right, given the latent margins."""
    count, n = margin.shape
    y = np.broadcast_to(margin[:, None, :] > 0, (count, k, n)).copy()
    c, i = np.nonzero(np.abs(margin) <= cutoff)  # only contested images need draws
    g = rng.normal(0.0, sigma_g, (count, k)).astype(np.float32)
    eps = rng.standard_normal((c.size, k), dtype=np.float32)
    y[c, :, i] = margin[c, i][:, None] + g[c] + eps > 0
    return y


def test_sets(rng: np.random.Generator, model: Model, gain: float, sigma_d: float, size: int, n: int):
    """Latent margins (size x n) of the baseline and the candidate on `size` fresh test sets."""
    margin = (model.mu + model.sigma_u * rng.standard_normal((size, n))).astype(np.float32)
    shift = model.shift_for_gain(gain, sigma_d) if gain or sigma_d else 0.0
    other = margin + np.float32(shift)
    if sigma_d:
        other += (sigma_d * rng.standard_normal((size, n))).astype(np.float32)
    return margin, other


def simulate(
    rng: np.random.Generator, model: Model, k: int, gain: float, count: int, n: int, sigma_d: float = 0.0, chunk=50
):
    """Yield (baseline, candidate) replicate tables, seeds x images, for `count` comparisons."""
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        margin, other = test_sets(rng, model, gain, sigma_d, size, n)
        a = replicates(rng, margin, model.sigma_g, k, model.cutoff)
        b = replicates(rng, other, model.sigma_g, k, model.cutoff)
        yield from zip(a, b)
