"""`cifar-rounds report BASELINE CANDIDATE`: what changed between two rounds, and did it help.

Each side is a round with one or more replicates (seeds), found as DVC
experiments, git revisions or MLflow runs (see `replicates`). The Markdown
report (and its learning-curve figure) is built from measured data only: the
metrics file, the per-epoch history, the per-example test predictions and the
params of each replicate. With two or more seeds per side the verdict is on the
configuration (seeds and test images both vary); with one, it compares two
trained models and says how many seeds a configuration verdict needs.

Read-only by default: it writes only its Markdown, figure and next-round sweep files
(beside each other, under reports/ unless --out says otherwise), logs the report to the
candidate's MLflow run, and says where the registered model's aliases should point
(`champion`). `--move-aliases` moves them as it says, and prints each move.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.champion import plan_aliases, refuse_a_champion_elsewhere, registered_model_of, reuse_line
from cifar_rounds.analysis.criteria import (
    MIN_CHAMPION_SEEDS,
    decision_alpha,
    passes,
    planned_round,
    policy_lines,
    seeds_line,
    values,
)
from cifar_rounds.analysis.details import plot_curves, round_section
from cifar_rounds.analysis.proposals import SWEEP_TRIALS, next_round_lines, proposals, trial_budget
from cifar_rounds.analysis.registry_state import Plan, RegistryState, apply_plan, read_registry
from cifar_rounds.analysis.replicates import ArtifactPaths, Round, find_round, number
from cifar_rounds.analysis.summary import format_mean_std, mean_std
from cifar_rounds.analysis.verdict import DEFAULT_TARGET_GAIN, Verdict, compare_configs, wilson_interval
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.inputs import command_parser, output_file
from cifar_rounds.core.names import REPORT_ARTIFACTS, RUN_CONDITIONS
from cifar_rounds.core.params import Params, ReportParams, load_params
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.tracking.store import open_client, repo_root

EXAMPLE = """examples:
  cifar-rounds report round-1 round-2                  # reports/round-round-1-vs-round-2.md and .png
  cifar-rounds report round-1 round-2 --move-aliases   # the same, and move @round-1, @round-2, @champion as it says"""
PERFORMANCE = (
    ("Test accuracy", "test_accuracy", "{:.2%}"),
    ("Training accuracy", "train_accuracy", "{:.2%}"),
    ("Validation accuracy", "val_accuracy", "{:.2%}"),
    ("Training loss", "train_loss", "{:.4f}"),
    ("Validation loss", "val_loss", "{:.4f}"),
    ("Stopped at epoch", "stopped_epoch", "{:.0f}"),
    ("Best epoch", "best_epoch", "{:.0f}"),
)


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
    same_config = {"train.seed", "tracking.round", "tracking.preset", "tracking.planned_seeds", "tracking.run_name"}
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


def round_verdict(base: Round, cand: Round, alpha: float, gain: float = DEFAULT_TARGET_GAIN) -> Verdict:
    """The verdict on the rounds' distinct replicates (bit-identical models are one seed, not several), with the
    seeds it advises for detecting `gain` (a fraction)."""
    same_test_set(base, cand)
    a, b = ([rep.correct for rep in r.distinct] for r in (base, cand))
    return compare_configs(a, b, alpha, target_gain=gain)


def gain_points(text: str) -> float:
    """`--gain`: the gain in test accuracy worth detecting, in points, as a fraction."""
    try:
        points = float(text)
    except ValueError:
        points = math.nan
    if not 0 < points < 100:
        raise StageError(f"--gain {text!r}: expected the gain worth detecting in points of accuracy, e.g. 0.5")
    return points / 100


def verdict_lines(base: Round, cand: Round, v: Verdict) -> list[str]:
    n = len(cand.first.predictions)
    lines = []
    for r in (base, cand):
        for rep in r.replicates:
            k = int(rep.correct.sum())
            lo, hi = wilson_interval(k, n)
            lines.append(f"- {rep.label}: test accuracy {k / n:.2%} (95% interval {lo:.2%} to {hi:.2%}, n = {n})")
    for r in (base, cand):
        if len(r.distinct) < len(r.replicates):
            lines.append(
                f"- {r.name}: {len(r.replicates)} runs, of which {len(r.distinct)} with distinct test predictions: "
                f"the verdict counts {len(r.distinct)} seed(s)"
            )
    return lines + [f"- {sentence}" for sentence in verdict_sentences(v, base, cand)]


def verdict_sentences(v: Verdict, base: Round, cand: Round) -> list[str]:
    if min(v.seeds_baseline, v.seeds_candidate) < 2:  # two trained models, not two configurations
        a, b = base.distinct[0].label, cand.distinct[0].label
        outcome = f"the trained models {a} and {b} " + (
            "differ on these test images" if v.real else "do not differ distinguishably on these test images"
        )
    elif min(v.seeds_baseline, v.seeds_candidate) < MIN_CHAMPION_SEEDS:
        outcome = (
            f"p is {'below' if v.real else 'not below'} alpha, but with fewer than {MIN_CHAMPION_SEEDS} seeds per "
            "side the decision rule does not judge the configurations: run more seeds"
        )
    else:
        outcome = f"the configuration change from {base.name} to {cand.name} is " + (
            "real" if v.real else "not distinguishable from noise"
        )
    sentences = [
        f"{v.method}: difference in mean test accuracy {v.difference:+.2%} ({v.level:.0%} interval "
        f"{v.low:+.2%} to {v.high:+.2%}), p = {v.p_value:.4g}; at alpha = {v.alpha:g} (this comparison's share "
        f"of the test set's alpha) {outcome}",
        v.covers,
    ]
    # with one seed a side the advice is already the caveat's last sentence
    advice = [v.seed_advice] if v.seed_advice and v.seed_advice not in v.caveat else []
    return sentences + ([v.caveat] if v.caveat else []) + advice


def alias_lines(base: Round, cand: Round, state: RegistryState, plan: Plan, v: Verdict, applied: bool) -> list[str]:
    how = "moved by this report" if applied else "read-only: `--move-aliases` applies this plan"
    head = ["", f"## Registered model {state.name}: aliases ({how})", seeds_line(base), seeds_line(cand)]
    return head + plan.lines + [reuse_line(state, base, cand, v, applied)]


def render(
    base: Round, cand: Round, v: Verdict, rp: ReportParams, aliases: list[str], figure: str, next_round: list[str]
) -> str:
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
    out += ["", "## Decision policy (the workspace's params.yaml `report:`)"] + policy_lines(rp, (base, cand))
    out += aliases
    for r in (base, cand):
        out += round_section(r, rp)
    out += next_round
    out += ["", "## Learning curves (mean over seeds; band: min to max)", "", f"![learning curves]({figure})", ""]
    return "\n".join(out)


def write_report(text: str, rounds: list[Round], out: Path) -> Path:
    """The Markdown and its figure, each written whole or not at all."""
    figure = out.with_suffix(".png")
    plot_curves(rounds, figure)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return figure


def registry_of(params: Params, base: Round, cand: Round) -> tuple[MlflowClient, RegistryState]:
    """The registered model both rounds registered under, as it is now."""
    client, _ = open_client(params)
    patience = params.tracking.store_patience_s
    name = registered_model_of(base, cand)
    refuse_a_champion_elsewhere(client, params.tracking.registered_model, name, patience)
    return client, read_registry(client, name, (base, cand), cand.first.metrics["test_set_digest"], patience)


def decide_aliases(
    client: MlflowClient,
    state: RegistryState,
    params: Params,
    rounds: tuple[Round, Round],
    alpha: float,
    gain: float,
    move: bool,
) -> list[str]:
    """The alias section: the plan from the registry as it is, applied (and each move printed) with `move`. The
    decision reads the rounds' planned seeds only, at `alpha`, this comparison's share on the test set."""
    base, cand = rounds
    planned = (planned_round(base), planned_round(cand))
    v = round_verdict(*planned, alpha, gain)
    plan = plan_aliases(state, base, cand, tuple(passes(r, params.report) for r in planned), v)
    if move:
        for line in apply_plan(client, state, plan, params.tracking.store_patience_s):
            print(line)
    return alias_lines(base, cand, state, plan, v, move)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = command_parser(prog, __doc__.splitlines()[0], EXAMPLE)
    parser.add_argument(
        "baseline",
        help="round: DVC experiment (or NAME-s0, NAME-s1, ...), git revision, MLflow "
        "round, run name or run id; or a comma-separated list of those",
    )
    parser.add_argument("candidate", help="round, as for baseline")
    parser.add_argument(
        "--out", type=Path, help="Markdown file (default: beside the history, round-BASELINE-vs-CANDIDATE.md)"
    )
    parser.add_argument(
        "--move-aliases",
        action="store_true",
        help="move @<round> and @champion of the registered model as the report decides, and count the decision "
        "against the test set (default: read-only, the report only says where they should point)",
    )
    # trial_budget's StageError is not argparse's: one line, from run_stage
    parser.add_argument("--sweep-trials", type=trial_budget, default=SWEEP_TRIALS, help="trials per proposed sweep")
    parser.add_argument(
        "--gain",
        type=gain_points,
        default=DEFAULT_TARGET_GAIN,
        metavar="POINTS",
        help=f"the gain in test accuracy worth detecting, in points: the seeds advice plans for it "
        f"(default {100 * DEFAULT_TARGET_GAIN:g})",
    )
    args = parser.parse_args(argv)
    if args.out:
        output_file(args.out, "the report's Markdown")
    params = load_params()
    root = repo_root()
    paths = ArtifactPaths.from_dvc(root)
    base, cand = (find_round(ref, params, root, paths) for ref in (args.baseline, args.candidate))
    safe = lambda name: "".join(c if c.isalnum() or c in "-_." else "_" for c in name)  # noqa: E731
    out = args.out or Path(paths.history).parent / f"round-{safe(base.name)}-vs-{safe(cand.name)}.md"
    client, state = registry_of(params, base, cand)
    alpha = decision_alpha(params.report.significance, state.earlier(base.name, cand.name))
    v = round_verdict(base, cand, alpha, args.gain)  # at the decision's alpha: "real" means what it decides
    aliases = decide_aliases(client, state, params, (base, cand), alpha, args.gain, args.move_aliases)
    # the proposals' sweep files, written beside the report
    next_round = next_round_lines(cand, params.report, out.with_suffix(".next"), args.sweep_trials)
    text = render(base, cand, v, params.report, aliases, out.with_suffix(".png").name, next_round)
    figure = write_report(text, [base, cand], out)
    tracker = Tracker.attach(params, cand.first.metrics["mlflow_run_id"])
    tracker.log_artifact(out, REPORT_ARTIFACTS)
    tracker.log_artifact(figure, REPORT_ARTIFACTS)
    files = (
        f"; next-round sweep files in {out.with_suffix('.next')}" if proposals(cand, params.report) else "; no proposal"
    )
    print(f"report: {out} (figure {figure}{files})")


if __name__ == "__main__":
    run_stage(main)
