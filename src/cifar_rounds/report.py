"""`python -m cifar_rounds.report BASELINE CANDIDATE`: what changed between two rounds, and did it help.

Each side is a DVC experiment name, a git revision or an MLflow run name. The
Markdown report (and its learning-curve figure) is built from measured data
only: the metrics file, the per-epoch history, the per-example test
predictions and the params of each round.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from cifar_rounds.cli import StageError, run_stage
from cifar_rounds.names import RUN_CONDITIONS
from cifar_rounds.figures import pyplot, save_figure
from cifar_rounds.params import PARAMS_FILE, Params, load_params, params_from_text
from cifar_rounds.tracking import Tracker, open_client, repo_root

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Round:
    label: str
    params: Params
    metrics: dict
    history: list[dict[str, float]]
    predictions: list[tuple[str, str]]  # (actual, predicted) per test image, in test-set order


@dataclass(frozen=True)
class ArtifactPaths:
    """Where the pipeline writes what the report reads, as dvc.yaml declares it."""

    metrics: str
    history: str
    predictions: str

    @classmethod
    def from_dvc(cls, root: Path) -> ArtifactPaths:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            outs = {s.name: s.outs for s in repo.index.stages}
        metrics = next(o.def_path for o in outs["evaluate"] if o.metric)
        history = next(o.def_path for o in outs["train"] if o.def_path.endswith(".csv"))  # its one CSV output
        predictions = next(o.def_path for o in outs["evaluate"] if o.plot)
        return cls(metrics, history, predictions)


def parse_round(label: str, params: str, metrics: str, history: str, predictions: str) -> Round:
    rows = list(csv.DictReader(io.StringIO(history)))
    preds = [(r["actual"], r["predicted"]) for r in csv.DictReader(io.StringIO(predictions))]
    return Round(
        label, params_from_text(params, Path(f"{label}:{PARAMS_FILE}")), json.loads(metrics),
        [{k: number(r, k) for k in r} for r in rows], preds,
    )


def from_dvc(root: Path, rev: str, paths: ArtifactPaths) -> Round | None:
    import dvc.api
    from dvc.exceptions import DvcException
    from dvc.scm import RevError

    try:
        texts = [dvc.api.read(p, repo=str(root), rev=rev) for p in (str(PARAMS_FILE), paths.metrics, paths.history, paths.predictions)]
    except (RevError, DvcException, FileNotFoundError):
        return None
    return parse_round(rev, *texts)


def from_mlflow(params: Params, name: str, paths: ArtifactPaths) -> Round | None:
    client, experiment = open_client(params)
    runs = client.search_runs([experiment], f"attributes.run_name = '{name}'", max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    files = [str(PARAMS_FILE), f"evaluation/{Path(paths.metrics).name}", Path(paths.history).name,
             f"evaluation/{Path(paths.predictions).name}"]
    texts = [Path(client.download_artifacts(run_id, f)).read_text() for f in files]
    return parse_round(name, *texts)


def load_round(ref: str, params: Params, root: Path, paths: ArtifactPaths) -> Round:
    found = from_dvc(root, ref, paths) or from_mlflow(params, ref, paths)
    if found is None:
        raise StageError(f"{ref!r} is neither a DVC experiment, a git revision nor an MLflow run name")
    return found


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
    tail = sum(Fraction(math.comb(n, k)) for k in range(min(b, c) + 1)) / 2**n
    return float(min(Fraction(1), 2 * tail))


def discordant_pairs(base: Round, cand: Round) -> tuple[int, int]:
    """(baseline right & candidate wrong, baseline wrong & candidate right) over the same test images."""
    if [a for a, _ in base.predictions] != [a for a, _ in cand.predictions]:
        raise StageError(f"{base.label} and {cand.label} were not evaluated on the same test images")
    b = sum(pa == a and pc != a for (a, pa), (_, pc) in zip(base.predictions, cand.predictions))
    c = sum(pa != a and pc == a for (a, pa), (_, pc) in zip(base.predictions, cand.predictions))
    return b, c


def val_loss_minimum(r: Round) -> tuple[int, float]:
    best = min(r.history, key=lambda row: row["val_loss"])
    return int(best["epoch"]), best["val_loss"]


def criteria(r: Round, rp) -> list[tuple[str, str, bool]]:
    """(criterion, measured, passed) for the round's success criteria."""
    m = r.metrics
    gap = m["train_accuracy"] - m["test_accuracy"]
    _, min_loss = val_loss_minimum(r)
    rise = r.history[-1]["val_loss"] / min_loss - 1
    return [
        (f"test accuracy > {rp.min_test_accuracy:.2%}", f"{m['test_accuracy']:.2%}", m["test_accuracy"] > rp.min_test_accuracy),
        (f"train-test gap < {rp.max_train_test_gap:.2%}", f"{gap:.2%}", gap < rp.max_train_test_gap),
        (f"stable validation loss: final at most {rp.max_val_loss_rise:.0%} above its minimum",
         f"{rise:+.1%}", rise <= rp.max_val_loss_rise),
    ]


def diagnostics(r: Round) -> list[str]:
    tp, m = r.params.train, r.metrics
    notes = []
    last_milestone = max(tp.lr_milestones, default=0)
    if m["stopped_epoch"] < tp.num_epochs and m["stopped_epoch"] <= last_milestone:
        notes.append(f"early stopping ended the run at epoch {m['stopped_epoch']}, before the last "
                     f"learning-rate milestone ({last_milestone}): later decays never happened")
    gaps = [b - a for a, b in zip([0, *tp.lr_milestones], tp.lr_milestones)]
    if gaps and tp.patience < max(gaps):
        notes.append(f"patience ({tp.patience}) is shorter than the longest stretch between milestones "
                     f"({max(gaps)} epochs): a plateau at constant learning rate can stop the run before the next decay")
    epoch, loss = val_loss_minimum(r)
    notes.append(f"learning rate at the stop: {r.history[-1]['learning_rate']:.3g}")
    notes.append(f"validation loss reached its minimum {loss:.4f} at epoch {epoch} (best checkpoint: epoch {m['best_epoch']})")
    return notes


def overfitting(r: Round) -> list[str]:
    m = r.metrics
    _, min_loss = val_loss_minimum(r)
    final = r.history[-1]["val_loss"]
    return [
        f"train-test accuracy gap: {m['train_accuracy'] - m['test_accuracy']:.2%}",
        f"train loss {m['train_loss']:.4f}" + (" (near zero: memorisation)" if m["train_loss"] < 0.01 else ""),
        f"validation loss at the stop {final:.4f} vs minimum {min_loss:.4f} ({final / min_loss - 1:+.1%})",
    ]


def number(row: dict, key: str) -> float:
    """A history value; NaN where the column is absent or blank (diagnostic not measured that epoch)."""
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


def noise_and_sharpness(r: Round) -> list[str]:
    """B_simple against the batch used, and sharpness where it was measured."""
    lines = []
    noise = [(int(row["epoch"]), number(row, "noise_scale")) for row in r.history]
    noise = [(e, b) for e, b in noise if math.isfinite(b)]
    batch = r.params.train.batch_size
    if noise:
        epoch, b_simple = noise[-1]
        side = "below" if batch < b_simple else "above"
        lines.append(f"- gradient noise scale B_simple at epoch {epoch}: {b_simple:.4g}; the batch size {batch} is "
                     f"{max(batch, b_simple) / max(min(batch, b_simple), 1e-12):.3g}x {side} it (B_simple approximates the critical batch)")
    rows = [row for row in r.history if math.isfinite(number(row, "lambda_max"))]
    if rows:
        lines += ["", "| epoch | lambda_max | stability bound (SGD with momentum) | Tr(H) | Tr(H)/lambda_max |",
                  "|---|---|---|---|---|"]
        for row in rows:
            lam, tr = number(row, "lambda_max"), number(row, "hessian_trace")
            lines.append(f"| {int(row['epoch'])} | {lam:.4g} | {number(row, 'stability_bound'):.4g} | {tr:.4g} | {tr / lam:.3g} |")
    return lines or ["- not measured (diagnostics off)"]


PERFORMANCE = (
    ("Test accuracy", "test_accuracy", "{:.2%}"), ("Training accuracy", "train_accuracy", "{:.2%}"),
    ("Validation accuracy", "val_accuracy", "{:.2%}"), ("Training loss", "train_loss", "{:.4f}"),
    ("Validation loss", "val_loss", "{:.4f}"), ("Stopped at epoch", "stopped_epoch", "{:.0f}"),
    ("Best epoch", "best_epoch", "{:.0f}"),
)


def performance_lines(base: Round, cand: Round) -> list[str]:
    lines = []
    for title, key, fmt in PERFORMANCE:
        a, b = base.metrics[key], cand.metrics[key]
        change = f"{b - a:+.2%}" if fmt.endswith("%}") else f"{b - a:+.4g}"
        lines.append(f"- {title}: {fmt.format(a)} -> {fmt.format(b)} ({change})")
    return lines


def param_changes(base: Round, cand: Round) -> list[str]:
    a, b = base.params.flat(), cand.params.flat()
    return [f"| `{k}` | {a[k]} | {b[k]} |" for k in sorted(a) if a[k] != b[k]]


def condition_lines(base: Round, cand: Round) -> list[str]:
    """Device and precision of each round's training; a difference is a change params.yaml does not show."""
    a, b = ({k: r.metrics.get(k, "not recorded") for k in RUN_CONDITIONS} for r in (base, cand))
    lines = [f"- {k}: {a[k]}" + ("" if a[k] == b[k] else f" -> {b[k]} (changed)") for k in RUN_CONDITIONS]
    if a != b:
        lines.append("- the rounds trained under different conditions: part of any difference between them "
                     "may come from these rather than from the hyperparameters")
    return lines


def significance_lines(base: Round, cand: Round, alpha: float) -> list[str]:
    b, c = discordant_pairs(base, cand)
    p = mcnemar_exact(b, c)
    n = len(cand.predictions)
    lines = []
    for r in (base, cand):
        k = sum(a == p_ for a, p_ in r.predictions)
        lo, hi = wilson_interval(k, n)
        lines.append(f"- {r.label}: test accuracy {k / n:.2%} (95% interval {lo:.2%} to {hi:.2%}, n = {n})")
    verdict = "real (p < {:.2g})".format(alpha) if p < alpha else "not distinguishable from noise (p >= {:.2g})".format(alpha)
    lines.append(f"- exact McNemar test on the same {n} test images: {b} images only {base.label} got right, "
                 f"{c} only {cand.label} got right; p = {p:.4g}: the change is {verdict}")
    return lines


def render(base: Round, cand: Round, rp, figure: str) -> str:
    out = [f"# Round report: {base.label} -> {cand.label}", "", "## Performance", f"{base.label} -> {cand.label}:"]
    out += performance_lines(base, cand)
    out += ["", "## Hyperparameter changes", "", f"| parameter | {base.label} | {cand.label} |", "|---|---|---|"]
    out += param_changes(base, cand) or ["| (none) | | |"]
    out += ["", "## Run conditions (not in params.yaml)"] + condition_lines(base, cand)
    out += ["", "## Is the change in test accuracy real?"] + significance_lines(base, cand, rp.significance)
    for r in (base, cand):
        out += ["", f"## {r.label}", "", "Overfitting indicators:"] + [f"- {x}" for x in overfitting(r)]
        out += ["", "Success criteria:"]
        out += [f"- [{'x' if ok else ' '}] {name}: {value} ({'pass' if ok else 'FAIL'})" for name, value, ok in criteria(r, rp)]
        out += ["", "Diagnostics:"] + [f"- {x}" for x in diagnostics(r)]
        out += ["", "Noise scale and sharpness (Tr(H)/lambda_max is the seed's B* proxy):"] + noise_and_sharpness(r)
    out += ["", "## Learning curves", "", f"![learning curves]({figure})", ""]
    return "\n".join(out)


def plot_curves(rounds: list[Round], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    for r, colour in zip(rounds, ("tab:blue", "tab:orange")):
        epochs = [row["epoch"] for row in r.history]
        for ax, key in ((axes[0], "accuracy"), (axes[1], "loss")):
            ax.plot(epochs, [row[f"train_{key}"] for row in r.history], color=colour, ls="--", label=f"{r.label} train")
            ax.plot(epochs, [row[f"val_{key}"] for row in r.history], color=colour, label=f"{r.label} val")
        axes[2].plot(epochs, [row["learning_rate"] for row in r.history], color=colour, label=r.label)
    for ax, title in zip(axes, ("accuracy", "loss", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")  # validation spikes would flatten everything else
    axes[2].set_yscale("log")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="DVC experiment name, git revision or MLflow run name")
    parser.add_argument("candidate", help="DVC experiment name, git revision or MLflow run name")
    parser.add_argument("--out", type=Path, help="Markdown file (default: reports/round-BASELINE-vs-CANDIDATE.md)")
    args = parser.parse_args()
    params = load_params()
    root = repo_root()
    paths = ArtifactPaths.from_dvc(root)
    base, cand = (load_round(ref, params, root, paths) for ref in (args.baseline, args.candidate))
    out = args.out or Path("reports") / f"round-{args.baseline}-vs-{args.candidate}.md"
    figure = out.with_suffix(".png")
    plot_curves([base, cand], figure)
    out.write_text(render(base, cand, params.report, figure.name))
    tracker = Tracker.attach(params, cand.metrics["mlflow_run_id"])
    tracker.log_artifact(out, "report")
    tracker.log_artifact(figure, "report")
    print(f"report: {out} (figure {figure})")


if __name__ == "__main__":
    run_stage(main)
