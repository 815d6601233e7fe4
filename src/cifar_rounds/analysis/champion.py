"""Which version the registered model's aliases point at: the decision, from the round report's measurements.

The report points `@<round>` at each round's best version (its best seed by test accuracy)
and moves `@champion` to the candidate's best version only when the candidate passes its
success criteria and the configuration verdict says it beats the round the champion comes
from; otherwise it says why the champion stayed. `tracking.registry` moves what it is told.
"""

from __future__ import annotations

from typing import Literal

from mlflow.entities.model_registry import ModelVersion

from cifar_rounds.analysis.replicates import Replicate, Round
from cifar_rounds.analysis.verdict import Verdict
from cifar_rounds.core.params import Params
from cifar_rounds.tracking.registry import CHAMPION, alias_version, round_alias, run_version, set_alias
from cifar_rounds.tracking.store import open_client

Side = Literal["none", "baseline", "candidate", "other"]  # where the current champion comes from


def best_replicate(r: Round) -> Replicate:
    """The round's best seed by test accuracy (the first of a tie)."""
    return max(r.replicates, key=lambda rep: rep.metrics["test_accuracy"])


def run_ids(r: Round) -> set[str]:
    return {rep.metrics["mlflow_run_id"] for rep in r.replicates}


def champion_side(champion: ModelVersion | None, base: Round, cand: Round) -> Side:
    if champion is None:
        return "none"
    if champion.run_id in run_ids(cand):
        return "candidate"
    return "baseline" if champion.run_id in run_ids(base) else "other"


def champion_decision(side: Side, passes: bool, v: Verdict, base: str, cand: str) -> tuple[bool, str]:
    """(move @champion to the candidate's best version?, why), from measured facts only."""
    if not passes:
        return False, f"{cand} does not pass its success criteria"
    if side == "none":
        return True, f"there was no champion, and {cand} passes its success criteria"
    if side == "candidate":
        return (
            True,
            f"the champion already comes from {cand}, which passes its success criteria; it "
            "follows the round's best seed",
        )
    if side == "other":
        return False, (
            f"the champion comes from neither {base} nor {cand}, so this report's verdict does not "
            f"compare {cand} with it; report the champion's round against {cand}"
        )
    if min(v.seeds_baseline, v.seeds_candidate) < 2:
        return False, (
            "with one seed on a side the verdict compares two trained models, not configurations; "
            "run both rounds with --seeds 2 or more"
        )
    if not (v.real and v.difference > 0):
        return False, (
            f"the configuration verdict does not say {cand} beats {base}, the champion's round "
            f"(difference {v.difference:+.2%}, p = {v.p_value:.4g}, alpha = {v.alpha:g})"
        )
    return (
        True,
        f"{cand} passes its success criteria and its configuration beats {base}, the champion's "
        f"round (p = {v.p_value:.4g})",
    )


def move_aliases(params: Params, base: Round, cand: Round, passes: bool, v: Verdict) -> list[str]:
    """Point `@<round>` at each round's best version and decide `@champion`; the report's lines saying so."""
    client, _ = open_client(params)
    name, patience = params.tracking.registered_model, params.tracking.store_patience_s
    lines, best = [], {}
    for r in (base, cand):
        rep = best_replicate(r)
        version = run_version(client, name, rep.metrics["mlflow_run_id"], patience)
        if version is None:
            lines.append(
                f"- {r.name}: its best seed {rep.label} registered no version of {name} "
                "(tracking.log_model off, or trained before registration): @"
                f"{round_alias(r.name)} not moved"
            )
            continue
        best[r.name] = version
        alias = round_alias(r.name)
        set_alias(client, name, alias, version.version, patience)
        lines.append(
            f"- @{alias} -> {name} version {version.version} ({rep.label}, test accuracy "
            f"{rep.metrics['test_accuracy']:.2%})"
        )
    champion = alias_version(client, name, CHAMPION, patience)
    move, why = champion_decision(champion_side(champion, base, cand), passes, v, base.name, cand.name)
    if move and cand.name not in best:
        move, why = False, f"{cand.name} has no registered version"
    if move:
        target = best[cand.name].version
        set_alias(client, name, CHAMPION, target, patience)
        return lines + [f"- @{CHAMPION} -> version {target}: {why}"]
    held = f"version {champion.version}" if champion else "no version"
    return lines + [f"- @{CHAMPION} stays at {held}: {why}"]
