"""The round report's section on one round: criteria, overfitting, per-class accuracy, diagnostics, noise and sharpness;
and its learning-curve figure, each round's mean over seeds with its min-to-max band.

Criteria are judged with the workspace's thresholds (`criteria`); the rest describes the round's
first replicate from its measurements.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cifar_rounds.analysis.criteria import criteria, val_loss_minimum
from cifar_rounds.analysis.proposals import BATCH_HEADROOM, last_noise_scale
from cifar_rounds.analysis.replicates import Replicate, Round, number
from cifar_rounds.core.figures import pyplot, save_figure
from cifar_rounds.core.params import ReportParams


def diagnostics(rep: Replicate) -> list[str]:
    train, m = rep.params.train, rep.metrics
    notes = []
    last_milestone = max(train.lr_milestones, default=0)
    if m["stopped_epoch"] < train.num_epochs and m["stopped_epoch"] <= last_milestone:
        notes.append(
            f"early stopping ended the run at epoch {m['stopped_epoch']}, before the last "
            f"learning-rate milestone ({last_milestone}): later decays never happened"
        )
    gaps = [b - a for a, b in zip([0, *train.lr_milestones], train.lr_milestones)]
    if gaps and train.patience < max(gaps):
        notes.append(
            f"patience ({train.patience}) is shorter than the longest stretch between milestones "
            f"({max(gaps)} epochs): a plateau at constant learning rate can stop the run before the next decay"
        )
    epoch, loss = val_loss_minimum(rep)
    notes.append(f"learning rate at the stop: {rep.history[-1]['learning_rate']:.3g}")
    notes.append(
        f"validation loss reached its minimum {loss:.4f} at epoch {epoch} (best checkpoint: epoch {m['best_epoch']})"
    )
    return notes


def overfitting(rep: Replicate) -> list[str]:
    m = rep.metrics
    _, min_loss = val_loss_minimum(rep)
    final = rep.history[-1]["val_loss"]
    return [
        f"train-test accuracy gap: {m['train_accuracy'] - m['test_accuracy']:.2%}",
        f"train loss {m['train_loss']:.4f}" + (" (near zero: memorisation)" if m["train_loss"] < 0.01 else ""),
        f"validation loss at the stop {final:.4f} vs minimum {min_loss:.4f} ({final / min_loss - 1:+.1%})",
    ]


def per_class_lines(rep: Replicate) -> list[str]:
    """Per-class test accuracy; a class without test images says so instead of a 0%."""
    per_class = rep.metrics.get("per_class_accuracy", {})
    return [f"{name}: {'no images' if acc is None else f'{acc:.2%}'}" for name, acc in per_class.items()]


def noise_line(r: Round) -> list[str]:
    """B_simple at each seed's last epoch, as the batch rule reads it (the round's mean, with the seeds' range),
    against the batch used; 'not measurable' when the mean is not a positive number."""
    rep = r.first
    if not (rep.params.diagnostics.noise_scale and rep.history):
        return []
    values = [last_noise_scale(x) for x in r.replicates]
    b_simple = sum(values) / len(values)
    seeds = f" (mean of {len(values)} seeds, {min(values):.4g} to {max(values):.4g})" if len(values) > 1 else ""
    if not (math.isfinite(b_simple) and b_simple > 0):
        return [
            f"- gradient noise scale B_simple at the last epoch: not measurable ({b_simple:.4g}{seeds}: the |G|^2 "
            "estimate is not positive, noise dominates the gradient)"
        ]
    batch = rep.params.train.batch_size
    side = "below" if batch < b_simple else "above"
    return [
        f"- gradient noise scale B_simple at the last epoch: {b_simple:.4g}{seeds}; the batch size {batch} is "
        f"{max(batch, b_simple) / min(batch, b_simple):.3g}x {side} it (B_simple approximates the critical batch; "
        f"a larger batch is proposed from {BATCH_HEADROOM:g}x)"
    ]


def noise_and_sharpness(r: Round) -> list[str]:
    """B_simple against the batch used (the round's), and sharpness where it was measured (the first seed's)."""
    rep = r.first
    lines = noise_line(r)
    rows = [row for row in rep.history if math.isfinite(number(row, "lambda_max"))]
    if rows:
        lines += [
            "",
            "| epoch | lambda_max | stability bound (SGD with momentum) | Tr(H) | Tr(H)/lambda_max |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            lam, tr = number(row, "lambda_max"), number(row, "hessian_trace")
            lines.append(
                f"| {int(row['epoch'])} | {lam:.4g} | {number(row, 'stability_bound'):.4g} | "
                f"{tr:.4g} | {tr / lam:.3g} |"
            )
    return lines or ["- not measured (diagnostics off)"]


def round_section(r: Round, rp: ReportParams) -> list[str]:
    rep = r.first
    out = [
        "",
        f"## {r.name}",
        f"Seeds: {len(r.replicates)} ({', '.join(x.label for x in r.replicates)})",
        "",
        "Success criteria (mean over distinct seeds, the workspace's thresholds):",
    ]
    out += [
        f"- [{'x' if ok else ' '}] {name}: {value} ({'pass' if ok else 'FAIL'})" for name, value, ok in criteria(r, rp)
    ]
    out += ["", f"Overfitting indicators ({rep.label}):"] + [f"- {x}" for x in overfitting(rep)]
    out += ["", f"Per-class test accuracy ({rep.label}): " + "; ".join(per_class_lines(rep))]
    out += ["", f"Diagnostics ({rep.label}):"] + [f"- {x}" for x in diagnostics(rep)]
    out += [
        "",
        f"Noise scale and sharpness (sharpness: {rep.label}; Tr(H)/lambda_max is the founding analysis's B* proxy):",
    ]
    return out + noise_and_sharpness(r)


def curve_band(r: Round, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs that every replicate reached, and the mean, min and max of `key` over replicates there."""
    epochs = min(len(rep.history) for rep in r.replicates)
    table = np.array([[row[key] for row in rep.history[:epochs]] for rep in r.replicates])
    return np.arange(1, epochs + 1), table.mean(0), table.min(0), table.max(0)


def plot_curves(rounds: list[Round], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    for r, colour in zip(rounds, ("tab:blue", "tab:orange")):
        for ax, key in ((axes[0], "accuracy"), (axes[1], "loss")):
            for split, style in (("train", "--"), ("val", "-")):
                epochs, mean, low, high = curve_band(r, f"{split}_{key}")
                ax.plot(epochs, mean, color=colour, ls=style, label=f"{r.name} {split}")
                ax.fill_between(epochs, low, high, color=colour, alpha=0.15, lw=0)
        epochs, lr, _, _ = curve_band(r, "learning_rate")
        axes[2].step(epochs, lr, where="post", color=colour, label=r.name)  # constant within an epoch
    for ax, title, ylabel in zip(
        axes, ("accuracy", "loss", "learning rate"), ("accuracy (fraction)", "cross-entropy loss", "learning rate")
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")  # validation spikes would flatten everything else
    axes[2].set_yscale("log")
    save_figure(fig, path)
