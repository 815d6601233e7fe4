"""A round's replicates, found where they live: DVC experiments, git revisions or MLflow runs.

A round named R is, in this order of search:
1. an explicit list `A,B,C` of any of the below, one replicate each;
2. the DVC experiments `R-s0`, `R-s1`, ... that `rounds run R --seeds N` made;
3. a DVC experiment or git revision `R` itself (one replicate);
4. the MLflow runs tagged `round=R` (one per seed), else the run named R (refused when
   several share the name), else the run whose id is R.
A run named twice (`A,A`) is one replicate; replicates with identical test predictions are one
seed for every decision (`Round.distinct`). Every replicate carries its own params.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.names import EVALUATION_ARTIFACTS, RUN_CONDITIONS
from cifar_rounds.core.params import PARAMS_FILE, Params, ParamsError, params_from_text
from cifar_rounds.tracking.store import open_client


@dataclass(frozen=True)
class Replicate:
    label: str
    params: Params
    metrics: dict
    history: list[dict[str, float]]
    predictions: list[tuple[str, str]]  # (actual, predicted) per test image, in test-set order
    conditions: dict[str, str] = field(default_factory=dict)  # how it trained (RUN_CONDITIONS)

    @property
    def correct(self) -> np.ndarray:
        return np.array([a == p for a, p in self.predictions], dtype=bool)


@dataclass(frozen=True)
class Round:
    name: str
    replicates: list[Replicate]  # one per MLflow run
    repeated: tuple[str, ...] = ()  # labels given again for a run already in the round, left out

    @property
    def first(self) -> Replicate:
        return self.replicates[0]

    @property
    def distinct(self) -> list[Replicate]:
        """One replicate per distinct set of test predictions: bit-identical models are one seed, not several."""
        seen: set[tuple[tuple[str, str], ...]] = set()
        kept = []
        for rep in self.replicates:
            if (key := tuple(rep.predictions)) not in seen:
                seen.add(key)
                kept.append(rep)
        return kept


@dataclass(frozen=True)
class ArtifactPaths:
    """Where the pipeline writes what the report reads, as dvc.yaml declares it."""

    metrics: str
    history: str
    predictions: str
    conditions: str

    @classmethod
    def from_dvc(cls, root: Path) -> ArtifactPaths:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            outs = {s.name: s.outs for s in repo.index.stages}
        metrics = next(o.def_path for o in outs["evaluate"] if o.metric)
        history = next(o.def_path for o in outs["train"] if o.def_path.endswith(".csv"))  # its one CSV output
        predictions = next(o.def_path for o in outs["evaluate"] if o.plot)
        conditions = next(o.def_path for o in outs["evaluate"] if o.def_path.endswith(".json") and not o.metric)
        return cls(metrics, history, predictions, conditions)


def number(row: dict, key: str) -> float:
    """A history value; NaN where the column is absent or blank (diagnostic not measured that epoch)."""
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


# What the analysis reads of a replicate's measurements (the evaluate stage's metrics, the train stage's history)
NUMBER_METRICS = (
    "test_accuracy",
    "train_accuracy",
    "val_accuracy",
    "train_loss",
    "val_loss",
    "best_epoch",
    "stopped_epoch",
)
TEXT_METRICS = ("mlflow_run_id",)
HISTORY_COLUMNS = ("epoch", "train_accuracy", "val_accuracy", "train_loss", "val_loss", "learning_rate")


def metrics_problem(metrics: object) -> str | None:
    """What keeps a parsed metrics file from being read as a replicate's, in words; None if nothing."""
    if not isinstance(metrics, dict):
        return f"is a JSON {type(metrics).__name__}, expected an object of metrics"
    for key in NUMBER_METRICS + TEXT_METRICS:
        if key not in metrics:
            return f"lacks {key!r}"
    for key in NUMBER_METRICS:
        if isinstance(metrics[key], bool) or not isinstance(metrics[key], (int, float)):
            return f"has {key!r} = {metrics[key]!r}, expected a number"
    for key in TEXT_METRICS:
        if not isinstance(metrics[key], str):
            return f"has {key!r} = {metrics[key]!r}, expected a string"
    if not isinstance(metrics.get("per_class_accuracy", {}), dict):
        return "has 'per_class_accuracy' that is not an object"
    return None


def history_problem(rows: list[dict]) -> str | None:
    if not rows:
        return "has no epochs"
    missing = [c for c in HISTORY_COLUMNS if c not in rows[0]]
    return f"lacks the column {missing[0]!r}" if missing else None


def parse_replicate(
    label: str, params: str, metrics: str, history: str, predictions: str, conditions: str | None, paths: ArtifactPaths
) -> Replicate:
    """A replicate from its files' texts; anything the analysis cannot read is one line naming `label` and what."""
    try:
        parsed = json.loads(metrics)
        rows = list(csv.DictReader(io.StringIO(history)))
        preds = [(r["actual"], r["predicted"]) for r in csv.DictReader(io.StringIO(predictions))]
        replicate = Replicate(
            label,
            params_from_text(params, Path(f"{label}:{PARAMS_FILE}")),
            parsed,
            [{k: number(r, k) for k in r} for r in rows],
            preds,
            # runs evaluated before the conditions had a file of their own kept them in the metrics
            json.loads(conditions) if conditions else {k: parsed[k] for k in RUN_CONDITIONS if k in parsed},
        )
    except (json.JSONDecodeError, KeyError, ValueError, ParamsError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageError(f"{label}: its measurements cannot be read ({first})") from None
    for path, problem in ((paths.metrics, metrics_problem(parsed)), (paths.history, history_problem(rows))):
        if problem:
            raise StageError(
                f"{label}: its {Path(path).name} {problem}; rerun its pipeline, or leave it out of the round"
            )
    return replicate


def dvc_replicate(root: Path, rev: str, paths: ArtifactPaths) -> Replicate | None:
    """The replicate at a DVC experiment or git revision; None if no such revision."""
    import dvc.api
    from dvc.exceptions import DvcException
    from dvc.scm import RevError

    files = (str(PARAMS_FILE), paths.metrics, paths.history, paths.predictions)
    texts = []
    for path in files:
        try:
            texts.append(dvc.api.read(path, repo=str(root), rev=rev))
        except RevError:
            return None
        except (DvcException, FileNotFoundError):
            if path == str(PARAMS_FILE):
                return None
            raise StageError(
                f"{rev}: a revision without {path}; run the pipeline there first (dvc repro), or name a round that ran"
            ) from None
    try:
        conditions = dvc.api.read(paths.conditions, repo=str(root), rev=rev)
    except (DvcException, FileNotFoundError):  # evaluated before the conditions had a file
        conditions = None
    return parse_replicate(rev, *texts, conditions, paths)


def dvc_experiment_names(root: Path) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.experiments.ls(all_commits=True)
    return sorted({name for names in found.values() for name, _ in names if name})


def seed_of(name: str, round_name: str) -> int | None:
    match = re.fullmatch(rf"{re.escape(round_name)}-s(\d+)", name)
    return int(match.group(1)) if match else None


def dvc_round(root: Path, name: str, paths: ArtifactPaths) -> Round | None:
    replicas = sorted((seed_of(n, name), n) for n in dvc_experiment_names(root) if seed_of(n, name) is not None)
    if replicas:
        return Round(name, [dvc_replicate(root, n, paths) for _, n in replicas])
    single = dvc_replicate(root, name, paths)
    return Round(name, [single]) if single else None


def mlflow_runs(params: Params, ref: str) -> list:
    """Runs tagged with round `ref` (latest per seed), else the one run named or identified by `ref`."""
    client, experiment = open_client(params)
    runs = client.search_runs([experiment], max_results=5000, order_by=["attributes.start_time DESC"])
    by_seed = {}
    for r in runs:
        if r.data.tags.get("round") == ref:
            by_seed.setdefault(r.data.tags.get("seed"), r)
    if by_seed:
        return [by_seed[s] for s in sorted(by_seed, key=lambda s: int(s) if s and s.isdigit() else -1)]
    named = [r for r in runs if r.info.run_name == ref]
    if len(named) > 1:
        ids = ", ".join(r.info.run_id for r in named)
        raise StageError(f"{ref!r}: {len(named)} MLflow runs have this name ({ids}); name one by its run id")
    return named or [r for r in runs if r.info.run_id == ref]


def mlflow_replicate(params: Params, run, paths: ArtifactPaths) -> Replicate:
    client, _ = open_client(params)
    files = [
        str(PARAMS_FILE),
        f"{EVALUATION_ARTIFACTS}/{Path(paths.metrics).name}",
        Path(paths.history).name,
        f"{EVALUATION_ARTIFACTS}/{Path(paths.predictions).name}",
    ]
    try:
        texts = [Path(client.download_artifacts(run.info.run_id, f)).read_text() for f in files]
    except Exception:  # MlflowException, OSError: the run never got that far
        raise StageError(
            f"MLflow run {run.info.run_name!r} ({run.info.run_id}, {run.info.status}) has no "
            "evaluation; it did not finish the pipeline"
        ) from None
    name = f"{EVALUATION_ARTIFACTS}/{Path(paths.conditions).name}"
    try:
        conditions = Path(client.download_artifacts(run.info.run_id, name)).read_text()
    except Exception:  # MlflowException, OSError: evaluated before the conditions had a file
        conditions = None
    return parse_replicate(run.info.run_name, *texts, conditions, paths)


def one_per_run(name: str, replicates: list[Replicate]) -> Round:
    """The round with each MLflow run once: a run named twice is one seed, not two."""
    kept: dict[str, Replicate] = {}
    repeated = []
    for rep in replicates:
        run_id = rep.metrics.get("mlflow_run_id") or rep.label
        if run_id in kept:
            repeated.append(rep.label)
        else:
            kept[run_id] = rep
    return Round(name, list(kept.values()), tuple(repeated))


def find_round(ref: str, params: Params, root: Path, paths: ArtifactPaths) -> Round:
    if not all(part.strip() for part in ref.split(",")):  # DVC and git read an empty revision as the workspace
        raise StageError(
            f"round {ref!r}: an empty name; name a DVC experiment, git revision, MLflow round, run name or run id "
            "(several: A,B,C)"
        )
    if "," in ref:
        return one_per_run(
            ref, [r for part in ref.split(",") for r in find_round(part, params, root, paths).replicates]
        )
    found = dvc_round(root, ref, paths)
    if found is not None:
        return found
    runs = mlflow_runs(params, ref)
    if not runs:
        raise StageError(f"{ref!r} is neither a DVC experiment, a git revision, an MLflow round, run name nor run id")
    return Round(ref, [mlflow_replicate(params, r, paths) for r in runs])
