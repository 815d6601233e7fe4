"""Proposals for round N+1, each computed from a measurement of round N and citing it.

A proposal is made only where a measured value crosses a stated line; each comes
with the overrides it suggests and a sweep file that searches around them, which
`cifar-rounds sweep FILE` runs as it stands: its trials are the
round's configuration with only the searched values changed, and each space holds
both the round's value and its preset's. Proposals read training and validation
data only; the test set decides nothing here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from cifar_rounds.analysis.replicates import Replicate, Round, number
from cifar_rounds.analysis.rounds import PRESETS_DIR, load_preset
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import ReportParams, load_params, with_overrides
from cifar_rounds.core.yamlio import write_yaml

MEMORISED = 0.99  # train accuracy from which the train-validation gap is memorisation, not underfitting
BATCH_HEADROOM = 4.0  # B_simple this many times the batch: a larger batch costs little per sample
EDGE = 0.8  # lambda_max at this fraction of the stability bound: the learning rate is at its edge
FIRST_WEIGHT_DECAY = 5e-4  # proposed where the round had none: the usual weight decay of ResNets on CIFAR-10
SWEEP_TRIALS = 12  # each proposed sweep's trial budget, the enqueued preset included (report --sweep-trials)
# the sections whose values make a trial's configuration; train.seed is the replicate, not the configuration
CONFIGURATION = ("data", "model", "train")
NOT_CONFIGURATION = frozenset({"train.seed"})


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


def best_epoch_row(rep: Replicate) -> dict:
    """The history's row of the epoch whose checkpoint is evaluated (the last row if it is not recorded)."""
    best = rep.metrics.get("best_epoch")
    return next((row for row in rep.history if int(row["epoch"]) == best), rep.history[-1] if rep.history else {})


def more_regularisation(r: Round, limit: float) -> Proposal | None:
    """`limit`: the workspace's train-test gap criterion (never the round's own: one source of thresholds)."""
    train_acc = mean(r, lambda rep: number(best_epoch_row(rep), "train_accuracy"))
    gap = mean(r, lambda rep: number(best_epoch_row(rep), "train_val_accuracy_gap"))
    wd = r.first.params.train.weight_decay
    if not (train_acc >= MEMORISED and gap >= limit):  # NaN (not recorded) proposes nothing
        return None
    proposed = wd * 2 if wd > 0 else FIRST_WEIGHT_DECAY
    return Proposal(
        "regularisation",
        f"train accuracy {train_acc:.2%} with a train-validation gap of {gap:.2%} at the best epoch "
        f"(the gap criterion: < {limit:.2%}): the training set is memorised",
        "more regularisation: raise the weight decay",
        {"train.weight_decay": proposed},
        {"train.weight_decay": {"type": "float", "low": wd, "high": proposed * 4, "log": wd > 0}},
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
    patience = max(max(gaps), train.patience) + 5  # never shorter than the patience that stopped too early
    stops = ", ".join(str(rep.metrics["stopped_epoch"]) for rep in early)
    return Proposal(
        "patience",
        f"early stopping ended {len(early)} of {len(r.replicates)} runs (epochs {stops}) "
        f"before the last learning-rate milestone ({last}); patience {train.patience}",
        f"let the decays happen: patience {patience} (the longer of the current patience and the longest "
        "stretch between milestones, + 5)",
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


def proposals(r: Round, rp: ReportParams) -> list[Proposal]:
    """Each rule's proposal, read with the workspace's thresholds `rp`."""
    found = (
        more_regularisation(r, rp.max_train_test_gap),
        stopped_before_last_milestone(r),
        batch_below_noise_scale(r),
        lr_at_its_edge(r),
    )
    return [p for p in found if p is not None]


def spread_of(r: Round, get) -> str:
    """The round's mean of a reading, with its range over the seeds when there are several."""
    values = [get(rep) for rep in r.replicates]
    shown = f"{sum(values) / len(values):.4g}"
    return shown if len(values) < 2 else f"{shown} (seeds {min(values):.4g} to {max(values):.4g})"


def readings(r: Round, rp: ReportParams) -> list[str]:
    """What each rule read of the round, as it reads it (the mean over seeds), and the line it did not cross."""
    batch, stops = r.first.params.train.batch_size, [rep.metrics["stopped_epoch"] for rep in r.replicates]
    last = max(r.first.params.train.lr_milestones, default=0)
    lam = [number(row, "lambda_max") / number(row, "stability_bound") for rep in r.replicates for row in rep.history]
    edge = max((x for x in lam if math.isfinite(x)), default=math.nan)
    return [
        f"- memorisation: train accuracy {spread_of(r, lambda rep: number(best_epoch_row(rep), 'train_accuracy'))} "
        f"(line: {MEMORISED:.0%}) and train-validation gap "
        f"{spread_of(r, lambda rep: number(best_epoch_row(rep), 'train_val_accuracy_gap'))} (line: "
        f"{rp.max_train_test_gap:.4g}, the workspace's train-test gap criterion), at the best epoch",
        f"- early stopping: stopped at epochs {', '.join(map(str, stops))} (line: before the last milestone, {last})",
        f"- B_simple at the last epoch: {spread_of(r, last_noise_scale)} against the batch {batch} (line: "
        f"{BATCH_HEADROOM:g}x the batch, {BATCH_HEADROOM * batch:g})",
        f"- lambda_max at most {edge:.0%} of the stability bound (line: {EDGE:.0%})",
    ]


def covering(dimension: dict, values: list) -> dict:
    """The dimension widened to hold every value (a log range only while all of it is positive)."""
    if dimension["type"] == "categorical":
        return {**dimension, "choices": dimension["choices"] + [v for v in values if v not in dimension["choices"]]}
    low, high = min(dimension["low"], *values), max(dimension["high"], *values)
    return {**dimension, "low": low, "high": high, "log": dimension.get("log", False) and low > 0}


def study_name(round_name: str, slug: str) -> str:
    """A study name from any round name (a comma list of runs, a path): letters, digits, '_', '.' and '-'."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", round_name).strip("-_.")
    return f"{stem or 'round'}-{slug}"


def trial_budget(text: str) -> int:
    """`--sweep-trials`: a positive whole number; one line otherwise."""
    if not text.strip().isdecimal() or int(text) < 1:
        raise StageError(f"--sweep-trials {text!r}: expected a positive whole number of trials per proposed sweep")
    return int(text)


def sweep_tree(p: Proposal, r: Round, preset: str, trials: int) -> dict:
    """The sweep file's content: the round's configuration as it ran, the proposal's space around both values."""
    base = with_overrides(load_params(), load_preset(preset)).flat()  # what a trial starts from
    ran = r.first.params.flat()
    fixed = {
        k: v
        for k, v in ran.items()
        if k.split(".")[0] in CONFIGURATION and k not in NOT_CONFIGURATION and k not in p.space and v != base[k]
    }
    return {
        "study": study_name(r.name, p.slug),
        "baseline": preset,
        "trials": trials,
        "enqueue": [preset],
        "fixed": fixed,
        "space": {k: covering(d, [ran[k], base[k]]) for k, d in p.space.items()},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
    }


def write_sweep_file(p: Proposal, r: Round, folder: Path, trials: int) -> Path | None:
    """A sweep around the proposal, on top of the round's preset; None when the round is not a preset."""
    preset = r.first.params.tracking.preset
    if preset is None or not (PRESETS_DIR / f"{preset}.yaml").exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{p.slug}.yaml"
    header = (
        f"Proposed after {r.name}: {p.action}.\nEvidence: {p.evidence}.\n"
        f"fixed: the values {r.name} ran with where they differ from the preset {preset}; the promoted round keeps\n"
        "them. To shorten the trials, add a schedule: (e.g. train.num_epochs), which it does not keep."
    )
    write_yaml(sweep_tree(p, r, preset, trials), path, header)
    return path


def next_round_lines(r: Round, rp: ReportParams, folder: Path, trials: int = SWEEP_TRIALS) -> list[str]:
    """The report's "next round" section: each proposal, its evidence and the file that runs it (`trials` trials)."""
    found = proposals(r, rp)
    if not found:
        head = ["", f"## Next round (after {r.name})", ""]
        return (
            head
            + ["No proposal: no measurement crossed its line. What each rule read (mean over seeds):"]
            + (readings(r, rp))
        )
    lines = ["", f"## Next round (after {r.name})", ""]
    for p in found:
        values = " ".join(f"-S {k}={v:.4g}" if isinstance(v, float) else f"-S {k}={v}" for k, v in p.overrides.items())
        path = write_sweep_file(p, r, folder, trials)
        run = (
            f"`cifar-rounds sweep {path}`"
            if path
            else f"`cifar-rounds run PRESET {values}` (the round is not a preset)"
        )
        lines += [f"- **{p.action}**. Evidence: {p.evidence}. Try: `{values}`; search: {run}."]
    return lines
