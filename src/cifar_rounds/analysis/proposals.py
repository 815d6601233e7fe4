"""Proposals for round N+1, each computed from a measurement of round N and citing it.

A proposal is made only where a measured value crosses a stated line; each comes
with the overrides it suggests and a sweep file that searches around them, which
`python -m cifar_rounds.search.sweep FILE` runs as it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cifar_rounds.analysis.replicates import Replicate, Round, number
from cifar_rounds.analysis.rounds import PRESETS_DIR
from cifar_rounds.core.params import write_yaml

MEMORISED = 0.99  # train accuracy from which the train-test gap is memorisation, not underfitting
BATCH_HEADROOM = 4.0  # B_simple this many times the batch: a larger batch costs little per sample
EDGE = 0.8  # lambda_max at this fraction of the stability bound: the learning rate is at its edge


@dataclass(frozen=True)
class Proposal:
    slug: str  # file-name part
    evidence: str  # the measurement, with its numbers
    action: str  # what to change, in words
    overrides: dict[str, object]  # the suggested values
    space: dict[str, dict]  # the sweep around them


def mean(r: Round, get) -> float:
    values = [get(rep) for rep in r.replicates]
    return sum(values) / len(values)


def more_regularisation(r: Round) -> Proposal | None:
    train_acc = mean(r, lambda rep: rep.metrics["train_accuracy"])
    gap = mean(r, lambda rep: rep.metrics["train_accuracy"] - rep.metrics["test_accuracy"])
    limit, wd = r.first.params.report.max_train_test_gap, r.first.params.train.weight_decay
    if train_acc < MEMORISED or gap < limit:
        return None
    return Proposal(
        "regularisation",
        f"train accuracy {train_acc:.2%} with a train-test gap of {gap:.2%} "
        f"(criterion < {limit:.2%}): the training set is memorised",
        "more regularisation: raise the weight decay",
        {"train.weight_decay": wd * 2},
        {"train.weight_decay": {"type": "float", "low": wd, "high": wd * 8, "log": True}},
    )


def stopped_before_last_milestone(r: Round) -> Proposal | None:
    train = r.first.params.train
    last = max(train.lr_milestones, default=0)
    # metrics.json holds the stop: before num_epochs, early stopping ended the run
    early = [
        rep
        for rep in r.replicates
        if rep.metrics["stopped_epoch"] < train.num_epochs and rep.metrics["stopped_epoch"] <= last
    ]
    if not early:
        return None
    gaps = [b - a for a, b in zip([0, *train.lr_milestones], train.lr_milestones)]
    patience = max(gaps) + 5
    stops = ", ".join(str(rep.metrics["stopped_epoch"]) for rep in early)
    return Proposal(
        "patience",
        f"early stopping ended {len(early)} of {len(r.replicates)} runs (epochs {stops}) "
        f"before the last learning-rate milestone ({last}); patience {train.patience}",
        f"let the decays happen: patience {patience} (longest stretch between milestones + 5)",
        {"train.patience": patience},
        {"train.patience": {"type": "int", "low": train.patience, "high": patience + max(gaps)}},
    )


def last_noise_scale(rep: Replicate) -> float:
    finite = [number(row, "noise_scale") for row in rep.history if math.isfinite(number(row, "noise_scale"))]
    return finite[-1] if finite else math.nan


def batch_below_noise_scale(r: Round) -> Proposal | None:
    train = r.first.params.train
    b_simple = mean(r, last_noise_scale)
    if not (math.isfinite(b_simple) and b_simple >= BATCH_HEADROOM * train.batch_size):
        return None
    batch = train.batch_size * 2
    return Proposal(
        "batch",
        f"measured B_simple {b_simple:.0f} is {b_simple / train.batch_size:.1f}x the batch size "
        f"{train.batch_size}: below the critical batch, a larger batch loses little per sample",
        f"batch {batch} with the learning rate scaled linearly",
        {"train.batch_size": batch, "train.learning_rate": train.learning_rate * 2},
        {
            "train.batch_size": {"type": "categorical", "choices": [train.batch_size, batch, batch * 2]},
            "train.learning_rate": {
                "type": "float",
                "low": train.learning_rate,
                "high": train.learning_rate * 4,
                "log": True,
            },
        },
    )


def lr_at_its_edge(r: Round) -> Proposal | None:
    train = r.first.params.train
    rows = [
        (int(row["epoch"]), number(row, "lambda_max"), number(row, "stability_bound"))
        for rep in r.replicates
        for row in rep.history
    ]
    near = [(e, lam, bound) for e, lam, bound in rows if math.isfinite(lam) and bound > 0 and lam >= EDGE * bound]
    if not near:
        return None
    e, lam, bound = max(near, key=lambda x: x[1] / x[2])
    return Proposal(
        "learning-rate",
        f"lambda_max {lam:.4g} at epoch {e} is {lam / bound:.0%} of the stability "
        f"bound {bound:.4g}: the learning rate is at its edge",
        "a lower learning rate",
        {"train.learning_rate": train.learning_rate / 2},
        {
            "train.learning_rate": {
                "type": "float",
                "low": train.learning_rate / 8,
                "high": train.learning_rate,
                "log": True,
            }
        },
    )


RULES = (more_regularisation, stopped_before_last_milestone, batch_below_noise_scale, lr_at_its_edge)


def proposals(r: Round) -> list[Proposal]:
    return [p for p in (rule(r) for rule in RULES) if p is not None]


def write_sweep_file(p: Proposal, r: Round, folder: Path) -> Path | None:
    """A sweep around the proposal, on top of the round's preset; None when the round is not a preset."""
    preset = r.first.params.tracking.preset
    if preset is None or not (PRESETS_DIR / f"{preset}.yaml").exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{p.slug}.yaml"
    study = f"{r.name}-{p.slug}"
    tree = {
        "study": study,
        "baseline": preset,
        "trials": 12,
        "enqueue": [preset],
        "space": p.space,
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
    }
    write_yaml(tree, path, f"Proposed after {r.name}: {p.action}.\nEvidence: {p.evidence}.")
    return path


def next_round_lines(r: Round, folder: Path) -> list[str]:
    """The report's "next round" section: each proposal, its evidence and the file that runs it."""
    found = proposals(r)
    if not found:
        return [
            "",
            f"## Next round (after {r.name})",
            "",
            "No proposal: no measurement crossed a line that calls for a change.",
        ]
    lines = ["", f"## Next round (after {r.name})", ""]
    for p in found:
        values = " ".join(f"-S {k}={v:.4g}" if isinstance(v, float) else f"-S {k}={v}" for k, v in p.overrides.items())
        path = write_sweep_file(p, r, folder)
        run = (
            f"`python -m cifar_rounds.search.sweep {path}`"
            if path
            else f"`python -m cifar_rounds.analysis.rounds run PRESET {values}` (the round is not a preset)"
        )
        lines += [f"- **{p.action}**. Evidence: {p.evidence}. Try: `{values}`; search: {run}."]
    return lines
