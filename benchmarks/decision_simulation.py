"""The whole decision in simulation, as users repeat it: @champion moved by the report's own rules.

    python benchmarks/decision_simulation.py [--pairs 1000] [--gain-pairs 300] [--images 10000]

Rounds are simulated with the probit model of benchmarks/verdict_model.py (accuracy 93%, churn
5%, seed std 0.25 points on 10,000 test images), with per-image configuration differences: the
configurations disagree on --ratios times as many images as two seeds of one do. Null: every
configuration has the champion's population accuracy, so any @champion move is false. Gain: the
(first) candidate is 1 point better, so its move is the power.

Every report goes through the report's own functions: `criteria.missing_seeds` and
`criteria.planned_round` (aliases wait for the plan; the decision reads the first plan of 3 or
more seeds), `criteria.decision_alpha` (the comparison's share of alpha on the test set),
`verdict.compare_configs` (its advice plans the seeds) and `champion.champion_decision`. A round
is its seeds' correctness tables plus the `--seeds N` each seed was run with. Protocols, one
test set each, a report after every seed that arrives:

- advice: both rounds run a pilot of 2 seeds, then `--seeds N`, N the pilot report's advice for a
  1-point gain (at least 3; past --max-seeds the user stops at the pilot);
- peek to K: both rounds run `--seeds 3`, then 4, 5, ... K;
- 4 candidates: a champion round of 3 seeds, then four candidate rounds in a row against it
  (comparisons 1 to 4 on the test set), each by advice, or each peeking to 10 seeds;
- no champion: the baseline round is the incumbent (advice protocol; a move is the candidate's);
- sweep of 12: twelve one-seed trials on 5,000 validation images, the best promoted, replicated by
  advice against a champion round of 3 seeds; beside it, the best trial's apparent gain over the
  baseline's trial and the optimism the sweep report prints for it (`search.report.selection_optimism`).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from types import SimpleNamespace

import numpy as np
from verdict_model import Model, design_for_seed_std, replicates, sigma_d_for, test_sets

from cifar_rounds.analysis.champion import Side, champion_decision
from cifar_rounds.analysis.criteria import MIN_CHAMPION_SEEDS, decision_alpha, missing_seeds, planned_round
from cifar_rounds.analysis.replicates import Round
from cifar_rounds.analysis.verdict import compare_configs
from cifar_rounds.search.report import selection_optimism

PILOT = 2  # seeds per side of the pilot whose report advises the plan
GAIN = 0.01  # the gain the advice plans for, and the candidate's true gain in the power rows
TRIALS, VAL_IMAGES = 12, 5000  # the sweep protocol's trials and validation images


@dataclass
class Run:
    """A round as the report sees it: each seed's correctness over the test images, and its `--seeds N`."""

    margin: np.ndarray  # the configuration's latent margins on this test set
    model: Model
    rng: np.random.Generator
    seeds: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=bool))
    plans: list[int] = field(default_factory=list)

    def seeds_up_to(self, n: int, plan: int | None = None) -> None:
        """The seeds not run yet, up to n, recorded with the `--seeds` they ran under: `plan` (one command,
        `rounds run --seeds plan`, whose seeds finish one after another), or n (`--seeds n` itself)."""
        new = replicates(self.rng, self.margin[None], self.model.sigma_g, n - len(self.plans), self.model.cutoff)[0]
        self.seeds = new if not self.plans else np.concatenate([self.seeds, new])
        self.plans += [plan or n] * len(new)

    def as_round(self) -> Round:
        """What `planned_round` and `missing_seeds` read of each replicate: its plan and its seed."""
        reps = [
            SimpleNamespace(
                params=SimpleNamespace(tracking=SimpleNamespace(planned_seeds=p), train=SimpleNamespace(seed=s))
            )
            for s, p in enumerate(self.plans)
        ]
        return Round("r", reps)


def moves(champion: Run, candidate: Run, side: Side, alpha: float) -> bool:
    """One report: does @champion move to the candidate (both rounds pass their criteria)?"""
    rounds = (champion.as_round(), candidate.as_round())
    if any(missing_seeds(r) for r in rounds):
        return False
    ka, kb = (len(planned_round(r).replicates) for r in rounds)
    v = compare_configs(champion.seeds[:ka], candidate.seeds[:kb], alpha, target_gain=GAIN)
    return champion_decision(side, (True, True), v, ("a", "b")).holder == "candidate"


def advised(champion: Run, candidate: Run, alpha: float) -> int | None:
    """The seeds per side the report advises for a 1-point gain at this comparison's alpha (at least 3)."""
    n = compare_configs(champion.seeds, candidate.seeds, alpha, target_gain=GAIN).recommended_seeds
    return n and max(n, MIN_CHAMPION_SEEDS)


def follow_advice(champion: Run, candidate: Run, side: Side, alpha: float, max_seeds: int, both: bool) -> bool:
    """Pilot, advice, then `--seeds plan`, reported as each seed finishes (`both`: the champion round runs the
    same plan alongside)."""
    for r in (champion, candidate) if both else (candidate,):
        r.seeds_up_to(PILOT)
    moved = moves(champion, candidate, side, alpha)
    plan = advised(champion, candidate, alpha)
    if plan is None or plan > max_seeds:
        return moved
    for n in range(PILOT + 1, plan + 1):
        for r in (champion, candidate) if both else (candidate,):
            r.seeds_up_to(n, plan)
        moved = moved or moves(champion, candidate, side, alpha)
    return moved


def peek(champion: Run, candidate: Run, side: Side, alpha: float, last: int, both: bool) -> bool:
    """`--seeds 3`, then 4, 5, ... `last`, a report after each."""
    moved = False
    for n in range(MIN_CHAMPION_SEEDS, last + 1):
        for r in (champion, candidate) if both else (candidate,):
            r.seeds_up_to(n)
        moved = moved or moves(champion, candidate, side, alpha)
    return moved


@dataclass(frozen=True)
class World:
    model: Model
    sigma_d: float
    images: int
    alpha: float
    max_seeds: int

    def pair(self, rng: np.random.Generator, gain: float) -> tuple[Run, Run]:
        margin, other = test_sets(rng, self.model, gain, self.sigma_d, 1, self.images)
        return Run(margin[0], self.model, rng), Run(other[0], self.model, rng)

    def candidate(self, rng: np.random.Generator, champion: Run, gain: float) -> Run:
        """Another configuration on the champion's test set: the same image difficulties, its own differences."""
        shift = self.model.shift_for_gain(gain, self.sigma_d) if gain or self.sigma_d else 0.0
        other = champion.margin + np.float32(shift)  # the champion's margins are the images' difficulties
        other += (self.sigma_d * rng.standard_normal(other.size)).astype(np.float32)
        return Run(other, self.model, rng)


def one_comparison(w: World, rng, gain: float, protocol: str) -> bool:
    champion, candidate = w.pair(rng, gain)
    alpha = decision_alpha(w.alpha, 0)
    if protocol == "advice":
        return follow_advice(champion, candidate, "baseline", alpha, w.max_seeds, both=True)
    if protocol == "no champion":
        return follow_advice(champion, candidate, "none", alpha, w.max_seeds, both=True)
    return peek(champion, candidate, "baseline", alpha, int(protocol.removeprefix("peek to ")), both=True)


def four_candidates(w: World, rng, gain: float, peeking: bool) -> bool:
    """Did any of four candidates in a row take @champion (the first is `gain` better, the others equal)?"""
    champion, _ = w.pair(rng, 0.0)
    champion.seeds_up_to(MIN_CHAMPION_SEEDS)
    for j in range(4):
        candidate = w.candidate(rng, champion, gain if j == 0 else 0.0)
        alpha = decision_alpha(w.alpha, j)
        if peeking:
            taken = peek(champion, candidate, "baseline", alpha, 10, both=False)
        else:
            taken = follow_advice(champion, candidate, "baseline", alpha, w.max_seeds, both=False)
        if taken:
            return True
    return False


def sweep_then_replicate(w: World, rng, gain: float, seed_std: float) -> tuple[bool, float, float]:
    """(moved, the best trial's apparent gain over the baseline's trial, the optimism printed for it)."""
    sd = math.sqrt(seed_std**2 + 0.93 * 0.07 / VAL_IMAGES)  # a one-seed trial's validation accuracy: seed and images
    val = rng.normal(0.0, sd, TRIALS)  # equal true accuracy; trial 0 runs the baseline preset
    apparent = float(val.max() - val[0])
    champion, _ = w.pair(rng, 0.0)
    champion.seeds_up_to(MIN_CHAMPION_SEEDS)
    promoted = w.candidate(rng, champion, gain)
    moved = follow_advice(champion, promoted, "baseline", decision_alpha(w.alpha, 0), w.max_seeds, both=False)
    return moved, apparent, selection_optimism(TRIALS, float(np.std(val, ddof=1)))


def rate(hits: int, count: int) -> str:
    p = hits / count
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / count):.3f}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000, help="null repetitions per protocol and --ratios value")
    p.add_argument("--gain-pairs", type=int, default=300, help="repetitions with a 1-point gain (power)")
    p.add_argument("--images", type=int, default=10_000, help="test images (CIFAR-10: 10,000)")
    p.add_argument("--accuracy", type=float, default=0.93, help="population accuracy (fraction)")
    p.add_argument("--churn", type=float, default=0.05, help="share of test images two seeds disagree on")
    p.add_argument("--seed-std", type=float, default=0.25, help="seed std of test accuracy (points)")
    p.add_argument("--ratios", type=str, default="1,1.5,2", help="configurations disagree on this x the churn")
    p.add_argument("--alpha", type=float, default=0.05, help="the workspace's report.significance")
    p.add_argument("--max-seeds", type=int, default=20, help="the most seeds per side a user runs")
    p.add_argument("--cutoff", type=float, default=4.0, help="latent margin beyond which an image is fixed")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole simulation")
    return p.parse_args()


PROTOCOLS = ("advice", "peek to 5", "peek to 10", "peek to 20", "no champion")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    model = design_for_seed_std(args.accuracy, args.churn, args.seed_std / 100, args.images, args.cutoff)
    bound = args.alpha + 3 * math.sqrt(args.alpha * (1 - args.alpha) / args.pairs)
    lines = ["| disagreement (x churn) | protocol | false @champion moves (null) | power (1 point better) | note |"]
    lines.append("|---|---|---|---|---|")
    ratios = [float(r) for r in args.ratios.split(",")]
    for ratio, seed in zip(ratios, np.random.SeedSequence(args.seed).spawn(len(ratios))):
        w = World(model, 0.0 if ratio == 1 else sigma_d_for(model, ratio), args.images, args.alpha, args.max_seeds)
        rng = np.random.default_rng(seed)
        rows: list[tuple[str, list[bool], list[bool], str]] = []
        for protocol in PROTOCOLS:
            null = [one_comparison(w, rng, 0.0, protocol) for _ in range(args.pairs)]
            power = (
                [one_comparison(w, rng, GAIN, protocol) for _ in range(args.gain_pairs)]
                if protocol in ("advice", "no champion")
                else []
            )
            rows.append((protocol, null, power, ""))
        for peeking in (False, True):
            null = [four_candidates(w, rng, 0.0, peeking) for _ in range(args.pairs)]
            power = [four_candidates(w, rng, GAIN, peeking) for _ in range(args.gain_pairs)]
            rows.append((f"4 candidates, {'peek to 10' if peeking else 'advice'}", null, power, "any of the four"))
        swept = [sweep_then_replicate(w, rng, 0.0, args.seed_std / 100) for _ in range(args.pairs)]
        gained = [sweep_then_replicate(w, rng, GAIN, args.seed_std / 100)[0] for _ in range(args.gain_pairs)]
        apparent, optimism = np.mean([s[1] for s in swept]), np.mean([s[2] for s in swept])
        note = f"best trial looked {100 * apparent:+.2f} points better; optimism printed {100 * optimism:.2f}"
        rows.append((f"sweep of {TRIALS}, promoted, replicated", [s[0] for s in swept], gained, note))
        for protocol, null, power, note in rows:
            within = "within" if np.mean(null) <= bound else "NOT within"
            shown = rate(sum(power), len(power)) if power else "-"
            lines.append(
                f"| {ratio:g} (sigma_d {w.sigma_d:.2f}) | {protocol} | {rate(sum(null), len(null))} ({within}) | "
                f"{shown} | {note} |"
            )
    head = [
        f"date: {date.today()}  host: {platform.machine()}, 1 process, numpy {np.__version__}, "
        f"{time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU",
        f"model: accuracy {args.accuracy:.1%}, churn {args.churn:.1%}, seed std {args.seed_std:g} points on "
        f"{args.images} images; alpha {args.alpha:g}; at most {args.max_seeds} seeds per side; "
        f"{args.pairs} null and {args.gain_pairs} gain repetitions per row",
        "",
    ]
    print("\n".join(head + lines + ["", f"bound: alpha + 3 SE = {bound:.3f}; power target: 0.8."]))


if __name__ == "__main__":
    main()
