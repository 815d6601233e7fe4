"""The sweep report: trials ranked, the best against the baseline, history, importances, pruning's savings,
and how busy the workers were (from the trials' MLflow runs).

Written to `reports/sweep-STUDY.md` and `.png`, and logged to the sweep's parent MLflow run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from cifar_rounds.core.figures import pyplot, save_figure
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.names import SWEEP_REPORT_ARTIFACTS
from cifar_rounds.core.params import with_overrides
from cifar_rounds.search.study import SURPLUS_ATTR, Driver, states
from cifar_rounds.training.trial import SWEEP_TAG, TRIAL_TAG

REPORTS_DIR = Path("reports")


def epochs_trained(trial) -> int:
    """Epochs the trial reported (one report per epoch)."""
    return max(trial.intermediate_values, default=0)


def planned_epochs(d: Driver, trial) -> int:
    """Epochs the trial would have trained without pruning: its train.num_epochs."""
    values = {**d.trial_base(), **d.sweep.decoded(trial.params)}
    return with_overrides(d.base, values).train.num_epochs


def ranked(d: Driver, trials: list) -> list:
    """Complete trials best first, then pruned by their last value, then the rest."""
    sign = -1 if d.sweep.objective.direction == "maximize" else 1
    order = {"COMPLETE": 0, "PRUNED": 1}

    def key(t):
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[epochs_trained(t)] if t.intermediate_values else None)
        )
        return order.get(t.state.name, 2), sign * value if value is not None else math.inf

    return sorted(trials, key=key)


def trial_table(d: Driver, trials: list) -> list[str]:
    names = list(d.sweep.space)
    lines = [
        f"| rank | trial | state | {d.sweep.objective.metric} | epochs | " + " | ".join(names) + " |",
        "|" + "---|" * (5 + len(names)),
    ]
    shown = states(d.study)  # a FAIL whose values were tried again reads RETRIED
    for i, t in enumerate(ranked(d, trials), 1):
        values = d.sweep.decoded(t.params)
        value = f"{t.value:.4f}" if t.value is not None else "–"
        origin = f" ({t.user_attrs['preset']})" if "preset" in t.user_attrs else ""
        lines.append(
            f"| {i} | {t.number}{origin} | {shown[t.number]} | {value} | {epochs_trained(t)} | "
            + " | ".join(str(values.get(n, "–")) for n in names)
            + " |"
        )
    return lines


def selection_optimism(trials: int, spread: float) -> float:
    """How far the best of `trials` equally good trials is expected to lie above any one of them: their spread
    (standard deviation of the objective) times the expected largest of `trials` standard normal draws,
    the integral of x * n * pdf(x) * cdf(x)^(n-1) (the winner's curse)."""
    normal, step = statistics.NormalDist(), 0.01
    grid = [-8 + step * i for i in range(1601)]
    expected_max = sum(x * trials * normal.pdf(x) * normal.cdf(x) ** (trials - 1) * step for x in grid)
    return spread * expected_max


def selection_lines(d: Driver, best, complete: list) -> list[str]:
    """The best trial's gain over the baseline preset's trial, with the optimism its selection implies."""
    baseline = [t for t in complete if t.user_attrs.get("preset") == d.sweep.baseline]
    if not baseline or len(complete) < 3:
        return []
    sign = 1 if d.sweep.objective.direction == "maximize" else -1
    gain = sign * (best.value - baseline[0].value)  # positive: the best trial is better
    spread = statistics.stdev(t.value for t in complete)
    optimism = selection_optimism(len(complete), spread)
    return [
        "",
        f"Against the baseline's own trial ({baseline[0].number}): {gain:+.4f}. Picking the best of {len(complete)} "
        f"trials makes it look better by about {optimism:.4f} even when all are equally good (their spread "
        f"{spread:.4f} x the expected largest of {len(complete)} draws): one seed each, on validation images. "
        "A promoted round is a hypothesis until its replicates, on fresh seeds, beat the champion's round in "
        "the round report; @champion never moves on a sweep's numbers.",
    ]


def best_against_baseline(d: Driver, best) -> list[str]:
    base = d.trial_base()
    changed = {k: v for k, v in d.sweep.decoded(best.params).items() if base.get(k) != v}
    lines = [
        f"Best: trial {best.number} ({d.trial_name(best.number)}), {d.sweep.objective.metric} {best.value:.4f}.",
        "",
        f"| parameter | {d.sweep.baseline} | trial {best.number} |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {base.get(k, '–')} | {v} |" for k, v in changed.items()] or ["| (none) | | |"]
    return lines


def importance_lines(d: Driver) -> list[str]:
    """fANOVA importances of the searched parameters, or why there are none."""
    import optuna

    try:
        importances = optuna.importance.get_param_importances(
            d.study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (RuntimeError, ValueError) as error:  # too few complete trials, or a single distinct value
        return [f"Not computable yet ({str(error).splitlines()[0]})."]
    return ["| parameter | importance (fANOVA) |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in importances.items()]


def pruning_lines(d: Driver, trials: list) -> list[str]:
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    trained = sum(epochs_trained(t) for t in trials)
    saved = sum(planned_epochs(d, t) - epochs_trained(t) for t in pruned)
    return [
        f"{len(pruned)} of {len(trials)} trials pruned; {trained} epochs trained, {saved} saved by pruning "
        f"({saved / max(trained + saved, 1):.0%} of the epochs the trials would have trained)."
    ]


def share_running(spans: list[tuple[int, int]], k: int) -> float | None:
    """Of the time from the first span's start to the last one's end, the share covered by k spans or more.

    A span ending when another starts does not overlap it. None without any time to share.
    """
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end before a start
    if not events or events[-1][0] == events[0][0]:
        return None
    covered, running, before = 0, 0, events[0][0]
    for at, step in events:
        covered += (at - before) if running >= k else 0
        running, before = running + step, at
    return covered / (events[-1][0] - events[0][0])


def most_running(spans: list[tuple[int, int]]) -> int:
    """The most spans running at one moment."""
    running, most = 0, 0
    for _, step in sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans]):
        running += step
        most = max(most, running)
    return most


def training_spans(d: Driver) -> list[tuple[int, int]]:
    """Start and end (ms) of each trial's finished MLflow run: the trainings (a run ended KILLED ended when a
    driver found its trial lost, not when it stopped training)."""
    experiment = d.store("reading the sweep's run", lambda: d.client.get_run(d.parent_run_id).info.experiment_id)
    runs = d.store(
        "finding the trials' runs",
        lambda: d.client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = '{d.sweep.study}'"),
    )
    return [
        (r.info.start_time, r.info.end_time)
        for r in runs
        if TRIAL_TAG in r.data.tags and r.info.status == "FINISHED" and r.info.end_time is not None
    ]


def busy_lines(spans: list[tuple[int, int]], workers: int | None) -> list[str]:
    """The share of the time from the first training's start to the last one's end that `workers` trainings ran
    (2 or more when the workers are not known), and the most that ran at once."""
    k = workers or 2
    share = share_running(spans, k)
    if share is None:
        return ["No two trainings' times to compare yet."]
    minutes = (max(e for _, e in spans) - min(s for s, _ in spans)) / 60_000
    return [
        f"{k if workers else f'{k} or more'} trainings ran {share:.0%} of the {minutes:.1f} min from the first "
        f"training's start to the last one's end"
        + (f" (`--workers {workers}`)" if workers else "")
        + f"; at most {most_running(spans)} at once ({len(spans)} finished trainings)."
    ]


def render(d: Driver, workers: int | None = None) -> str:
    trials = [t for t in d.study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    trials = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    lines = [
        f"# Sweep {d.sweep.study}",
        "",
        f"{len(trials)} trials, objective {d.sweep.objective.metric} ({d.sweep.objective.direction}), "
        f"sampler {d.sweep.sampler.kind}, pruner {d.sweep.pruner.kind}; MLflow parent run {d.parent_run_id}.",
        "",
        "## Trials",
        "",
        *trial_table(d, trials),
        "",
        "## Best trial against the baseline",
        "",
    ]
    if complete:
        lines += best_against_baseline(d, d.study.best_trial) + selection_lines(d, d.study.best_trial, complete)
    else:
        lines += ["No trial has completed."]
    lines += [
        "",
        "## Parameter importances",
        "",
        *importance_lines(d),
        "",
        "## Pruning",
        "",
        *pruning_lines(d, trials),
        "",
        "## Workers",
        "",
        *busy_lines(training_spans(d), workers),
        "",
        f"![optimisation history](sweep-{d.sweep.study}.png)",
        "",
    ]
    return "\n".join(lines)


def plot_history(d: Driver, path: Path) -> None:
    """Each finished trial's objective by trial number, and the best so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in d.study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [
            (t.number, t.value if t.value is not None else t.intermediate_values[epochs_trained(t)])
            for t in done
            if t.state.name == state and (t.value is not None or t.intermediate_values)
        ]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=state.lower())
    best, run = [], None
    for t in sorted((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.number):
        better = run is None or (t.value > run if d.sweep.objective.direction == "maximize" else t.value < run)
        run = t.value if better else run
        best.append((t.number, run))
    if best:
        ax.step(*zip(*best), where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(d.sweep.objective.metric)
    ax.set_title(f"Sweep {d.sweep.study}: optimisation history")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:  # none before a trial has finished
        ax.legend()
    save_figure(fig, path)


def write_sweep_report(d: Driver, workers: int | None = None, folder: Path = REPORTS_DIR) -> Path:
    """The report; `workers`: the trainings the driver kept running at once, if it ran any."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"sweep-{d.sweep.study}.md"
    plot_history(d, out.with_suffix(".png"))
    with atomic_path(out) as tmp:
        tmp.write_text(render(d, workers))
    for path in (out, out.with_suffix(".png")):
        d.store("logging the report", lambda: d.client.log_artifact(d.parent_run_id, str(path), SWEEP_REPORT_ARTIFACTS))
    c = {s: sum(t.state.name == s for t in d.study.get_trials(deepcopy=False)) for s in ("COMPLETE", "PRUNED", "FAIL")}
    for state, n in c.items():
        d.store("logging the counts", lambda: d.client.log_metric(d.parent_run_id, f"trials_{state.lower()}", n))
    if c["COMPLETE"]:
        best = f"best_{d.sweep.objective.metric}"
        d.store("logging the best value", lambda: d.client.log_metric(d.parent_run_id, best, d.study.best_value))
    print(f"sweep: report {out}")
    return out
