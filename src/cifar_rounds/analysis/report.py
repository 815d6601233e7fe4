"""`python -m cifar_rounds.analysis.report BASELINE CANDIDATE`: what changed between two rounds, and did it help.

Each side is a round with one or more replicates (seeds), found as DVC
experiments, git revisions or MLflow runs (see `replicates`). The Markdown
report (and its learning-curve figure) is built from measured data only: the
metrics file, the per-epoch history, the per-example test predictions and the
params of each replicate. With two or more seeds per side the verdict is on the
configuration (seeds and test images both vary); with one, it compares two
trained models and says how many seeds a configuration verdict needs. The
report is also what moves the registered model's aliases (`registry`): `@<round>`
for both rounds, and `@champion` when the candidate earns it.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import numpy as np

from cifar_rounds.analysis.champion import move_aliases
from cifar_rounds.analysis.proposals import next_round_lines
from cifar_rounds.analysis.replicates import ArtifactPaths, Replicate, Round, find_round, number
from cifar_rounds.analysis.verdict import (
    MeanStd,
    Verdict,
    compare_configs,
    format_mean_std,
    mean_std,
    t_quantile,
    wilson_interval,
)
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.figures import pyplot, save_figure
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.names import REPORT_ARTIFACTS, RUN_CONDITIONS
from cifar_rounds.core.params import ReportParams, load_params
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.tracking.store import repo_root

PERFORMANCE = (
    ("Test accuracy", "test_accuracy", "{:.2%}"),
    ("Training accuracy", "train_accuracy", "{:.2%}"),
    ("Validation accuracy", "val_accuracy", "{:.2%}"),
    ("Training loss", "train_loss", "{:.4f}"),
    ("Validation loss", "val_loss", "{:.4f}"),
    ("Stopped at epoch", "stopped_epoch", "{:.0f}"),
    ("Best epoch", "best_epoch", "{:.0f}"),
)


def values(r: Round, key: str) -> list[float]:
    return [rep.metrics[key] for rep in r.replicates if key in rep.metrics]


def performance_lines(base: Round, cand: Round) -> list[str]:
    """Each metric as mean ± std over seeds, and the change of the means."""
    lines = []
    for title, key, fmt in PERFORMANCE:
        a, b = mean_std(values(base, key)).mean, mean_std(values(cand, key)).mean
        change = f"{b - a:+.2%}" if fmt.endswith("%}") else f"{b - a:+.4g}"
        lines.append(
            f"- {title}: {format_mean_std(values(base, key), fmt)} -> "
            f"{format_mean_std(values(cand, key), fmt)} ({change} in the mean)"
        )
    return lines


def param_changes(base: Round, cand: Round) -> list[str]:
    """Changed params of the configurations; the seed and the round's name are not the configuration."""
    a, b = base.first.params.flat(), cand.first.params.flat()
    same_config = {"train.seed", "tracking.round", "tracking.run_name"}
    return [f"| `{k}` | {a[k]} | {b[k]} |" for k in sorted(a) if a[k] != b[k] and k not in same_config]


def condition_lines(base: Round, cand: Round) -> list[str]:
    """How each round's training ran on its machine; a difference is a change params.yaml does not show."""

    def conditions(r: Round) -> dict[str, str]:
        return {
            k: ", ".join(sorted({str(rep.conditions.get(k, "not recorded")) for rep in r.replicates}))
            for k in RUN_CONDITIONS
        }

    a, b = conditions(base), conditions(cand)
    lines = [f"- {k}: {a[k]}" + ("" if a[k] == b[k] else f" -> {b[k]} (changed)") for k in RUN_CONDITIONS]
    if a != b:
        lines.append(
            "- the rounds trained under different conditions: part of any difference between them "
            "may come from these rather than from the hyperparameters"
        )
    return lines


def per_seed(r: Round, key: str, pick) -> list[float]:
    """`pick` over each replicate's finite per-epoch values of `key`; replicates without any are left out."""
    rows = ([v for row in rep.history if math.isfinite(v := number(row, key))] for rep in r.replicates)
    return [pick(v) for v in rows if v]


def resource_lines(base: Round, cand: Round) -> list[str]:
    """Measured peak memory and training throughput of each round (a change of batch size changes both)."""
    measures = (
        (
            "peak memory, MiB (per seed its largest epoch's; CUDA: allocated tensors, CPU: the process's peak RSS)",
            "peak_memory_mb",
            max,
        ),
        ("training throughput, images/s (per seed its median epoch's)", "images_per_s", statistics.median),
    )
    return [
        f"- {title}: {format_mean_std(per_seed(base, key, pick), '{:.0f}')} -> "
        f"{format_mean_std(per_seed(cand, key, pick), '{:.0f}')}"
        for title, key, pick in measures
    ]


def same_test_set(base: Round, cand: Round) -> None:
    """Refuse to pair predictions unless every replicate saw the same test images (by content)."""
    digests = {rep.metrics.get("test_set_digest") for r in (base, cand) for rep in r.replicates}
    if len(digests) > 1 or None in digests:
        raise StageError(
            f"{base.name} and {cand.name} were not evaluated on the same test images (test-set "
            "digests differ or are not recorded); evaluate both on one split before comparing"
        )


def round_verdict(base: Round, cand: Round, alpha: float) -> Verdict:
    same_test_set(base, cand)
    return compare_configs([rep.correct for rep in base.replicates], [rep.correct for rep in cand.replicates], alpha)


def verdict_lines(base: Round, cand: Round, v: Verdict) -> list[str]:
    n = len(cand.first.predictions)
    lines = []
    for r in (base, cand):
        for rep in r.replicates:
            k = int(rep.correct.sum())
            lo, hi = wilson_interval(k, n)
            lines.append(f"- {rep.label}: test accuracy {k / n:.2%} (95% interval {lo:.2%} to {hi:.2%}, n = {n})")
    return lines + [f"- {sentence}" for sentence in verdict_sentences(v, base, cand)]


def verdict_sentences(v: Verdict, base: Round, cand: Round) -> list[str]:
    outcome = "real" if v.real else "not distinguishable from noise"
    sentences = [
        f"{v.method}: difference in mean test accuracy {v.difference:+.2%} ({v.level:.0%} interval "
        f"{v.low:+.2%} to {v.high:+.2%}), p = {v.p_value:.4g}; at alpha = {v.alpha:g} the change from "
        f"{base.name} to {cand.name} is {outcome}",
        v.covers,
    ]
    return sentences + ([v.caveat] if v.caveat else [])


def val_loss_minimum(rep: Replicate) -> tuple[int, float]:
    best = min(rep.history, key=lambda row: row["val_loss"])
    return int(best["epoch"]), best["val_loss"]


def spread(m: MeanStd, fmt: str) -> str:
    """The mean, and with two or more seeds its 95% t interval over seeds."""
    if m.n < 2:
        return fmt.format(m.mean)
    half = t_quantile(0.975, m.n - 1) * m.std / math.sqrt(m.n)
    low, high = fmt.format(m.mean - half), fmt.format(m.mean + half)
    return f"{fmt.format(m.mean)} (95% interval over {m.n} seeds {low} to {high})"


def criteria(r: Round) -> list[tuple[str, str, bool]]:
    """(criterion, measured, passed), judged on the mean over seeds with the round's own thresholds."""
    rp: ReportParams = r.first.params.report
    test = mean_std(values(r, "test_accuracy"))
    gap = mean_std([rep.metrics["train_accuracy"] - rep.metrics["test_accuracy"] for rep in r.replicates])
    rise = mean_std([rep.history[-1]["val_loss"] / val_loss_minimum(rep)[1] - 1 for rep in r.replicates])
    return [
        (f"test accuracy > {rp.min_test_accuracy:.2%}", spread(test, "{:.2%}"), test.mean > rp.min_test_accuracy),
        (f"train-test gap < {rp.max_train_test_gap:.2%}", spread(gap, "{:.2%}"), gap.mean < rp.max_train_test_gap),
        (
            f"stable validation loss: final at most {rp.max_val_loss_rise:.0%} above its minimum",
            spread(rise, "{:+.1%}"),
            rise.mean <= rp.max_val_loss_rise,
        ),
    ]


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


def noise_line(rep: Replicate) -> list[str]:
    """B_simple at the last epoch against the batch used; 'not measurable' when it is not a positive number."""
    if not (rep.params.diagnostics.noise_scale and rep.history):
        return []
    epoch, b_simple = int(rep.history[-1]["epoch"]), number(rep.history[-1], "noise_scale")
    if not (math.isfinite(b_simple) and b_simple > 0):
        return [
            f"- gradient noise scale B_simple at epoch {epoch}: not measurable ({b_simple:.4g}: the |G|^2 "
            "estimate is not positive, noise dominates the gradient)"
        ]
    batch = rep.params.train.batch_size
    side = "below" if batch < b_simple else "above"
    return [
        f"- gradient noise scale B_simple at epoch {epoch}: {b_simple:.4g}; the batch size {batch} is "
        f"{max(batch, b_simple) / min(batch, b_simple):.3g}x {side} it (B_simple approximates the critical batch)"
    ]


def noise_and_sharpness(rep: Replicate) -> list[str]:
    """B_simple against the batch used, and sharpness where it was measured."""
    lines = noise_line(rep)
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


def round_section(r: Round) -> list[str]:
    rep = r.first
    out = [
        "",
        f"## {r.name}",
        f"Seeds: {len(r.replicates)} ({', '.join(x.label for x in r.replicates)})",
        "",
        "Success criteria (mean over seeds, this round's own thresholds):",
    ]
    out += [f"- [{'x' if ok else ' '}] {name}: {value} ({'pass' if ok else 'FAIL'})" for name, value, ok in criteria(r)]
    out += ["", f"Overfitting indicators ({rep.label}):"] + [f"- {x}" for x in overfitting(rep)]
    out += ["", f"Per-class test accuracy ({rep.label}): " + "; ".join(per_class_lines(rep))]
    out += ["", f"Diagnostics ({rep.label}):"] + [f"- {x}" for x in diagnostics(rep)]
    out += ["", f"Noise scale and sharpness ({rep.label}; Tr(H)/lambda_max is the founding analysis's B* proxy):"]
    return out + noise_and_sharpness(rep)


def render(base: Round, cand: Round, v: Verdict, aliases: list[str], figure: str, next_round: list[str]) -> str:
    out = [
        f"# Round report: {base.name} -> {cand.name}",
        "",
        "## Performance (mean ± std over seeds)",
        f"{base.name} -> {cand.name}:",
    ]
    out += performance_lines(base, cand)
    out += ["", "## Hyperparameter changes", "", f"| parameter | {base.name} | {cand.name} |", "|---|---|---|"]
    out += param_changes(base, cand) or ["| (none) | | |"]
    out += ["", "## Run conditions (not in params.yaml)"] + condition_lines(base, cand) + resource_lines(base, cand)
    out += ["", "## Is the change in test accuracy real?"] + verdict_lines(base, cand, v)
    out += ["", "## Registered model aliases (moved by this report)"] + aliases
    for r in (base, cand):
        out += round_section(r)
    out += next_round
    out += ["", "## Learning curves (mean over seeds; band: min to max)", "", f"![learning curves]({figure})", ""]
    return "\n".join(out)


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


def write_report(text: str, rounds: list[Round], out: Path) -> Path:
    """The Markdown and its figure, each written whole or not at all."""
    figure = out.with_suffix(".png")
    plot_curves(rounds, figure)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "baseline",
        help="round: DVC experiment (or NAME-s0, NAME-s1, ...), git revision, MLflow "
        "round, run name or run id; or a comma-separated list of those",
    )
    parser.add_argument("candidate", help="round, as for baseline")
    parser.add_argument(
        "--out", type=Path, help="Markdown file (default: beside the history, round-BASELINE-vs-CANDIDATE.md)"
    )
    args = parser.parse_args()
    params = load_params()
    root = repo_root()
    paths = ArtifactPaths.from_dvc(root)
    base, cand = (find_round(ref, params, root, paths) for ref in (args.baseline, args.candidate))
    safe = lambda name: "".join(c if c.isalnum() or c in "-_." else "_" for c in name)  # noqa: E731
    out = args.out or Path(paths.history).parent / f"round-{safe(base.name)}-vs-{safe(cand.name)}.md"
    v = round_verdict(base, cand, params.report.significance)
    aliases = move_aliases(params, base, cand, all(ok for _, _, ok in criteria(cand)), v)
    next_round = next_round_lines(cand, out.with_suffix(".next"))  # writes the proposals' sweep files
    text = render(base, cand, v, aliases, out.with_suffix(".png").name, next_round)
    figure = write_report(text, [base, cand], out)
    tracker = Tracker.attach(params, cand.first.metrics["mlflow_run_id"])
    tracker.log_artifact(out, REPORT_ARTIFACTS)
    tracker.log_artifact(figure, REPORT_ARTIFACTS)
    print(f"report: {out} (figure {figure})")


if __name__ == "__main__":
    run_stage(main)
