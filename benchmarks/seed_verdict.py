"""Calibration of the round verdict in simulation: A/A false-positive rate and power against seeds per side.

    python benchmarks/seed_verdict.py [--comparisons 2000] [--power-comparisons 1000] [--images 10000]

Simulation model: the probit model of benchmarks/verdict_model.py (its docstring
gives it), tuned to CIFAR-10 ResNet-18. Two kinds of null: configurations that
share every image's difficulty (the candidate is a reseed of the baseline), and
the realistic one, configurations of equal population accuracy that disagree on
more images than two seeds of one do (--null-ratios: that many times the seeds'
churn), where the test-image term of the variance is not zero.

Each comparison runs `cifar_rounds.analysis.verdict.compare_configs` on the k replicates
of each side, and the one-seed McNemar verdict on the first replicate of each.
Prints, as Markdown for benchmarks/RESULTS.md: the A/A false-positive rate per
seed count (with a plain Welch t test on the per-seed accuracies and the one-seed
McNemar rate beside it), the same under the realistic null, power against the true
gain and seed count (simulated and closed form), the seed counts for 80% power,
McNemar's false-positive rate against the distribution-wise share of the seed
spread, and a two-level bootstrap's. About 8 CPU-minutes with the defaults
(each cell has its own child seed, so the numbers do not depend on --workers).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import time
import warnings
from datetime import date
from multiprocessing import Pool

import numpy as np
from scipy import stats
from verdict_model import Model, design, design_for_seed_std, dropped_share, sigma_d_for, simulate

from cifar_rounds.analysis.seeds import power, recommended_seeds
from cifar_rounds.analysis.verdict import compare_configs, difference_variance


def welch_rejects(a: np.ndarray, b: np.ndarray, alpha: float) -> bool:
    """A plain Welch t test on the per-seed accuracies: the seeds' variance only, no test-image term."""
    with warnings.catch_warnings():  # identical per-seed accuracies on a side: scipy warns, and the test is moot
        warnings.simplefilter("ignore", RuntimeWarning)
        return bool(stats.ttest_ind(b.mean(axis=1), a.mean(axis=1), equal_var=False).pvalue < alpha)


def run_cell(
    rng: np.random.Generator, model: Model, k: int, gain: float, count: int, n: int, alpha: float, spec: dict
) -> dict:
    """Verdicts on `count` simulated comparisons with k seeds per side and a true gain (fraction)."""
    real = mcnemar_real = welch_real = covered = 0
    differences, variances, seed_var, images = [], [], [], []
    for a, b in simulate(rng, model, k, gain, count, n, spec.get("sigma_d", 0.0)):
        v = compare_configs(a, b, alpha)
        real += v.real
        covered += v.low <= gain <= v.high
        differences.append(v.difference)
        parts = difference_variance(a, b)
        variances.append(parts.total)
        images.append(parts.images)
        seed_var.append(a.mean(axis=1).var(ddof=1))
        welch_real += welch_rejects(a, b, alpha)
        if spec["mcnemar"]:  # the one-seed verdict on the first replicate of each side
            mcnemar_real += compare_configs(a[:1], b[:1], alpha).real
    return {
        "count": count,
        "real": real,
        "mcnemar_real": mcnemar_real,
        "welch_real": welch_real,
        "covered": covered,
        "sd_difference": float(np.std(differences, ddof=1)),
        "se_estimated": math.sqrt(np.mean(variances)),
        "image_se": math.sqrt(np.mean(images)),
        "seed_std": math.sqrt(np.mean(seed_var)),
    }


def two_level_bootstrap_rejects(
    rng: np.random.Generator, a: np.ndarray, b: np.ndarray, resamples: int, level: float = 0.95
) -> bool:
    """Percentile interval of a bootstrap over seeds (per round) and images (shared): does it exclude 0?"""
    ka, n = a.shape
    kb = b.shape[0]
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(np.float32)
    per_seed_a = a.astype(np.float32) @ weights.T / n  # (ka, resamples): accuracy of each seed on each image resample
    per_seed_b = b.astype(np.float32) @ weights.T / n
    cols = np.arange(resamples)
    ma = per_seed_a[rng.integers(0, ka, (ka, resamples)), cols].mean(axis=0)
    mb = per_seed_b[rng.integers(0, kb, (kb, resamples)), cols].mean(axis=0)
    low, high = np.quantile(mb - ma, [(1 - level) / 2, (1 + level) / 2])
    return bool(low > 0 or high < 0)


def bootstrap_cell(rng: np.random.Generator, model: Model, k: int, count: int, n: int, resamples: int) -> dict:
    """A/A false positives of the two-level bootstrap, beside the verdict's, on the same comparisons."""
    boot = real = 0
    for a, b in simulate(rng, model, k, 0.0, count, n):
        boot += two_level_bootstrap_rejects(rng, a, b, resamples)
        real += compare_configs(a, b).real
    return {"count": count, "bootstrap_real": boot, "real": real}


def run_task(task: tuple) -> tuple[tuple, dict]:
    """One cell of the benchmark, from its own child seed (results do not depend on the worker count)."""
    key, seed, model, spec = task
    rng = np.random.default_rng(seed)
    if key[0] == "bootstrap":
        return key, bootstrap_cell(rng, model, spec["k"], spec["count"], spec["n"], spec["resamples"])
    return key, run_cell(rng, model, spec["k"], spec["gain"], spec["count"], spec["n"], spec["alpha"], spec)


def tasks(args: argparse.Namespace, model: Model, grid: list[int]) -> list[tuple]:
    """(key, seed, model, spec) for every cell: A/A and power over the grid, McNemar sensitivity, bootstrap."""
    base = {"n": args.images, "alpha": args.alpha}
    out = [(("aa", k), model, {**base, "k": k, "gain": 0.0, "count": args.comparisons, "mcnemar": True}) for k in grid]
    out += [
        (("power", g, k), model, {**base, "k": k, "gain": g / 100, "count": args.power_comparisons, "mcnemar": False})
        for g in args.gains
        for k in grid
    ]
    out += [
        (
            ("null", ratio, k),
            model,
            {**base, "k": k, "gain": 0.0, "count": args.null_comparisons, "mcnemar": False, "sigma_d": sigma_d},
        )
        for ratio, sigma_d in ((r, sigma_d_for(model, r)) for r in args.null_ratios)
        for k in args.null_seeds
    ]
    for dist in args.sensitivity:
        m = design(args.accuracy, args.churn, dist / 100, args.cutoff)
        out.append(
            (
                ("sensitivity", dist),
                m,
                {
                    **base,
                    "k": args.sensitivity_seeds,
                    "gain": 0.0,
                    "count": args.sensitivity_comparisons,
                    "mcnemar": True,
                },
            )
        )
    out += [
        (("bootstrap", k), model, {**base, "k": k, "count": args.bootstrap_comparisons, "resamples": args.resamples})
        for k in (2, 3, 5)
        if args.bootstrap_comparisons
    ]
    seeds = np.random.SeedSequence(args.seed).spawn(len(out))
    return [(key, seed, m, spec) for (key, m, spec), seed in zip(out, seeds)]


def rate(hits: int, count: int) -> tuple[float, float]:
    p = hits / count
    return p, math.sqrt(p * (1 - p) / count)


def aa_lines(results: dict, grid: list[int], alpha: float, seed_std: float) -> list[str]:
    lines = [
        "| seeds per side | comparisons | false-positive rate | alpha + 3 SE | within | sd of the difference: "
        "measured / closed form / estimated (points) | plain Welch | one-seed McNemar false-positive rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in grid:
        r = results[("aa", k)]
        fpr, se = rate(r["real"], r["count"])
        bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / r["count"])
        (mc, mc_se), (w, w_se) = rate(r["mcnemar_real"], r["count"]), rate(r["welch_real"], r["count"])
        lines.append(
            f"| {k} | {r['count']} | {fpr:.3f} ± {se:.3f} | {bound:.3f} | {'yes' if fpr <= bound else 'NO'} | "
            f"{100 * r['sd_difference']:.3f} / {100 * seed_std * math.sqrt(2 / k):.3f} / "
            f"{100 * r['se_estimated']:.3f} | {w:.3f} ± {w_se:.3f} | "
            f"{mc:.3f} ± {mc_se:.3f} |"
        )
    return lines


def null_lines(results: dict, model: Model, ratios: list[float], seeds: list[int], alpha: float) -> list[str]:
    """The realistic null: equal population accuracy, configurations that disagree on more images than seeds do."""
    lines = [
        "| disagreement (x the seeds' churn) | sigma_d | seeds per side | comparisons | this verdict | alpha + 3 SE | "
        "within | plain Welch | sd of the difference: measured / estimated (points) | image term's se (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in ratios:
        for k in seeds:
            r = results[("null", ratio, k)]
            (v, v_se), (w, w_se) = rate(r["real"], r["count"]), rate(r["welch_real"], r["count"])
            bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / r["count"])
            lines.append(
                f"| {ratio:g} | {sigma_d_for(model, ratio):.3f} | {k} | {r['count']} | {v:.3f} ± {v_se:.3f} | "
                f"{bound:.3f} | {'yes' if v <= bound else 'NO'} | {w:.3f} ± {w_se:.3f} | "
                f"{100 * r['sd_difference']:.3f} / {100 * r['se_estimated']:.3f} | {100 * r['image_se']:.3f} |"
            )
    return lines


def power_lines(results: dict, grid: list[int], gains: list[float], alpha: float, seed_std: float) -> list[str]:
    lines = ["| gain (points) | " + " | ".join(f"{k} seeds" for k in grid) + " |", "|---|" + "---|" * len(grid)]
    for g in gains:
        cells = []
        for k in grid:
            r = results[("power", g, k)]
            cells.append(f"{r['real'] / r['count']:.2f} ({power(k, g / 100, seed_std, alpha):.2f})")
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    cover = [r["covered"] / r["count"] for key, r in results.items() if key[0] == "power"]
    lines += [
        "",
        f"Coverage of the true gain by the 95% interval over these cells: {min(cover):.3f} to {max(cover):.3f} "
        f"(mean {np.mean(cover):.3f}).",
    ]
    return lines


def recommendation_lines(gains: list[float], alpha: float, stds: list[float]) -> list[str]:
    lines = [
        "| to detect a gain of | " + " | ".join(f"seed std {s:g} points" for s in stds) + " |",
        "|---|" + "---|" * len(stds),
    ]
    for g in gains:
        cells = [recommended_seeds(g / 100, s / 100, alpha) for s in stds]
        lines.append(
            f"| {g:g} points | " + " | ".join(f"{c} seeds per side" if c else "more than 100" for c in cells) + " |"
        )
    return lines


def sensitivity_lines(results: dict, values: list[float], k: int, images: int, churn: float) -> list[str]:
    lines = [
        f"| distribution-wise seed std (points) | seed std on {images} images | verdict, {k} seeds per side | "
        "one-seed McNemar |",
        "|---|---|---|---|",
    ]
    for dist in values:
        r = results[("sensitivity", dist)]
        total = math.sqrt((dist / 100) ** 2 + churn / (2 * images))
        (v, v_se), (m, m_se) = rate(r["real"], r["count"]), rate(r["mcnemar_real"], r["count"])
        lines.append(f"| {dist:g} | {100 * total:.3f} | {v:.3f} ± {v_se:.3f} | {m:.3f} ± {m_se:.3f} |")
    return lines


def bootstrap_lines(results: dict) -> list[str]:
    lines = ["| seeds per side | comparisons | two-level bootstrap | this verdict |", "|---|---|---|---|"]
    for key in sorted(k for k in results if k[0] == "bootstrap"):
        r = results[key]
        (b, b_se), (v, v_se) = rate(r["bootstrap_real"], r["count"]), rate(r["real"], r["count"])
        lines.append(f"| {key[1]} | {r['count']} | {b:.3f} ± {b_se:.3f} | {v:.3f} ± {v_se:.3f} |")
    return lines


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comparisons", type=int, default=2000, help="A/A comparisons per seed count")
    p.add_argument("--power-comparisons", type=int, default=1000, help="comparisons per (gain, seed count) cell")
    p.add_argument("--images", type=int, default=10_000, help="test images per comparison (CIFAR-10: 10,000)")
    p.add_argument("--accuracy", type=float, default=0.93, help="baseline's population accuracy (fraction)")
    p.add_argument("--churn", type=float, default=0.05, help="expected share of test images two seeds disagree on")
    p.add_argument(
        "--seed-std", type=float, default=0.25, help="seed-to-seed std of test accuracy on --images images (points)"
    )
    p.add_argument(
        "--cutoff", type=float, default=4.0, help="latent margin beyond which an image is always right/wrong"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts")
    p.add_argument(
        "--seeds",
        type=lambda t: [int(x) for x in floats(t)],
        default=[2, 3, 5, 8],
        help="seeds per side to simulate (the recommended counts are added)",
    )
    p.add_argument("--gains", type=floats, default=[0.25, 0.5, 1.0], help="true gains for the power table (points)")
    p.add_argument(
        "--sensitivity",
        type=floats,
        default=[0.0, 0.05, 0.1, 0.2, 0.3],
        help="distribution-wise seed stds (points) for the McNemar sensitivity table",
    )
    p.add_argument(
        "--null-ratios",
        type=floats,
        default=[1.2, 1.5, 2.0],
        help="realistic null: the configurations disagree on this many times the images two seeds do",
    )
    p.add_argument(
        "--null-seeds", type=lambda t: [int(x) for x in floats(t)], default=[2, 3, 5, 8], help="its seeds per side"
    )
    p.add_argument("--null-comparisons", type=int, default=2000, help="comparisons per realistic-null cell")
    p.add_argument("--sensitivity-seeds", type=int, default=3, help="seeds per side of the verdict in that table")
    p.add_argument("--sensitivity-comparisons", type=int, default=1000, help="A/A comparisons per sensitivity row")
    p.add_argument(
        "--bootstrap-comparisons", type=int, default=300, help="A/A comparisons for the bootstrap check (0: skip)"
    )
    p.add_argument("--resamples", type=int, default=400, help="resamples of the two-level bootstrap")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole simulation")
    return p.parse_args()


def header_lines(args: argparse.Namespace, model: Model, results: dict, grid: list[int], wall: float) -> list[str]:
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime  # the workers, reaped when the pool closed
    per_image = math.sqrt(args.churn / (2 * args.images))
    dist = math.sqrt((args.seed_std / 100) ** 2 - per_image**2)
    measured = np.mean([results[("aa", k)]["seed_std"] for k in grid])
    return [
        f"date: {date.today()}  host: {platform.machine()}, {args.workers} worker processes, numpy {np.__version__}, "
        f"{wall:.0f} s wall, {cpu:.0f} s CPU",
        f"model: accuracy {args.accuracy:.1%}, churn {args.churn:.1%}, seed std {args.seed_std:g} points on "
        f"{args.images} images (distribution-wise {100 * dist:.3f}, per-image flips {100 * per_image:.3f}); "
        f"sigma_u {model.sigma_u:.3f}, sigma_g {model.sigma_g:.4f}, mu {model.mu:.3f}; the cutoff drops "
        f"{dropped_share(model):.2e} of the per-image variance",
        f"measured seed std over the A/A runs: {100 * measured:.3f} points",
    ]


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    seed_std = args.seed_std / 100
    model = design_for_seed_std(args.accuracy, args.churn, seed_std, args.images, args.cutoff)
    grid = sorted(set(args.seeds) | {recommended_seeds(g / 100, seed_std, args.alpha) or 2 for g in args.gains})
    with Pool(args.workers) as pool:
        results = dict(pool.map(run_task, tasks(args, model, grid), chunksize=1))
    out = header_lines(args, model, results, grid, time.perf_counter() - start)
    out += ["", "A/A (identical configurations):", ""] + aa_lines(results, grid, args.alpha, seed_std)
    out += ["", "The realistic null (equal population accuracy, per-image configuration differences):", ""]
    out += null_lines(results, model, args.null_ratios, args.null_seeds, args.alpha)
    out += [
        "",
        f"Power, simulated (closed form), alpha {args.alpha:g}, {args.power_comparisons} comparisons per cell:",
        "",
    ]
    out += power_lines(results, grid, args.gains, args.alpha, seed_std)
    out += ["", "Seeds per side for 80% power (closed form):", ""]
    out += recommendation_lines(args.gains, args.alpha, [0.2, args.seed_std, 0.3])
    out += [
        "",
        "A/A false-positive rate against the distribution-wise seed spread "
        f"({args.sensitivity_comparisons} comparisons each):",
        "",
    ]
    out += sensitivity_lines(results, args.sensitivity, args.sensitivity_seeds, args.images, args.churn)
    if args.bootstrap_comparisons:
        out += [
            "",
            f"A/A false-positive rate of a two-level bootstrap ({args.resamples} resamples, percentile interval):",
            "",
        ]
        out += bootstrap_lines(results)
    print("\n".join(out))


if __name__ == "__main__":
    main()
