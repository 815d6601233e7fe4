"""Which version the registered model's aliases point at: the decision, from the round report's measurements.

`@<round>` points at the round's best seed by validation accuracy that has a version (the test set
does not pick it). `@champion` comes from one round: the champion's, or with no champion the
baseline's (the incumbent, if it passes the success criteria); the other round takes it only when it
passes and the configuration verdict, on the rounds' planned seeds at the comparison's share of
alpha (analysis.criteria), says it beats that round. Aliases wait until both rounds have their
planned seeds, and @champion moves only with `MIN_CHAMPION_SEEDS` distinct seeds per side. The
report only plans (`plan_aliases`); `registry_state.apply_plan` moves, records the champion and
counts the comparison on the registered model's tags. `tracking.registry` moves what it is told.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.criteria import MIN_CHAMPION_SEEDS, missing_seeds
from cifar_rounds.analysis.registry_state import Plan, RegistryState, comparison_key
from cifar_rounds.analysis.replicates import Round
from cifar_rounds.analysis.verdict import Verdict
from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.registry import CHAMPION, alias_version, round_alias

Side = Literal["none", "baseline", "candidate", "other"]  # where the current champion comes from
SIDES: tuple[Side, Side] = ("baseline", "candidate")


class Decision(NamedTuple):
    holder: Side | None  # the round @champion should come from; None: it stays where it is
    why: str
    tested: bool  # the decision read test-set results (criteria, verdict): one more use of the test set


def registered_model_of(base: Round, cand: Round) -> str:
    """The one registered model both rounds' runs registered under; refused when they differ."""
    names = {r.name: {rep.params.tracking.registered_model for rep in r.replicates} for r in (base, cand)}
    found = set().union(*names.values())
    if len(found) > 1:
        each = "; ".join(f"{r} under {', '.join(sorted(n))}" for r, n in names.items())
        raise StageError(f"the rounds registered under different registered models ({each}): one must hold both")
    return found.pop()


def refuse_a_champion_elsewhere(client: MlflowClient, workspace_model: str, name: str, patience: float) -> None:
    """The rounds' registered model must be the one whose @champion this workspace serves, when that has one."""
    if name != workspace_model and alias_version(client, workspace_model, CHAMPION, patience) is not None:
        raise StageError(
            f"the rounds registered under {name}, but the champion lives under {workspace_model} "
            "(this workspace's tracking.registered_model): one registered model must hold both"
        )


def champion_side(champion_run: str | None, base: Round, cand: Round) -> Side:
    if champion_run is None:
        return "none"
    for side, r in zip(SIDES, (base, cand)):
        if champion_run in {rep.metrics["mlflow_run_id"] for rep in r.replicates}:
            return side
    return "other"


def significantly_better(v: Verdict) -> int | None:
    """0 (baseline) or 1 (candidate) when the verdict says that one is better; None otherwise."""
    return (1 if v.difference > 0 else 0) if v.real else None


def verdict_text(v: Verdict) -> str:
    return f"difference {v.difference:+.2%}, p = {v.p_value:.4g}, alpha = {v.alpha:g}"


def challenge(holder: int, role: str, passes: tuple[bool, bool], v: Verdict, names: tuple[str, str]) -> Decision:
    """The round at index `holder` (0: baseline, 1: candidate) keeps or takes @champion in its `role` (the
    champion's round, or the incumbent with no champion yet); the other round takes it only when it passes and
    the verdict says its configuration is better."""
    challenger = 1 - holder
    if passes[challenger] and significantly_better(v) == challenger:
        return Decision(
            SIDES[challenger],
            f"{names[challenger]} passes the success criteria and its configuration beats {names[holder]}, "
            f"{role} ({verdict_text(v)})",
            True,
        )
    why = (
        f"the configuration verdict does not say {names[challenger]} beats {names[holder]}, {role} ({verdict_text(v)})"
        if passes[challenger]
        else f"{names[challenger]} does not pass the success criteria"
    )
    return Decision(SIDES[holder], why, True)


def champion_decision(side: Side, passes: tuple[bool, bool], v: Verdict, names: tuple[str, str]) -> Decision:
    """Which round @champion should come from, from measured facts only; `passes` and `names`: (baseline, candidate).

    With no champion yet the baseline is the incumbent: it takes @champion if it passes the success criteria,
    and the candidate takes it only by the rule that takes it from any champion."""
    if side == "other":
        return Decision(
            None,
            f"the champion comes from neither {names[0]} nor {names[1]}, so this report's verdict does not "
            f"compare them with it; report the champion's round against {names[1]}",
            False,
        )
    seeds = (v.seeds_baseline, v.seeds_candidate)
    if min(seeds) < MIN_CHAMPION_SEEDS:
        return Decision(
            None,
            f"@champion moves only with {MIN_CHAMPION_SEEDS} or more distinct seeds per side ({names[0]}: "
            f"{seeds[0]}, {names[1]}: {seeds[1]}); run both rounds with --seeds {MIN_CHAMPION_SEEDS} or more",
            False,
        )
    if side != "none":
        holder = SIDES.index(side)
        d = challenge(holder, "the champion's round", passes, v, names)
        stays = f"; the champion stays with {names[holder]}'s best seed" if d.holder == side else ""
        return Decision(d.holder, d.why + stays, True)
    d = challenge(0, "the incumbent", passes, v, names)
    if d.holder == "baseline" and not passes[0]:
        return Decision(None, f"there is no champion: {names[0]} does not pass the success criteria, and {d.why}", True)
    taker = names[SIDES.index(d.holder)]
    return Decision(d.holder, f"there was no champion; {taker} takes it: {d.why}", True)


def refuse_shared_aliases(state: RegistryState, base: Round, cand: Round) -> None:
    """Each alias belongs to one round: a round whose alias another round holds (now or in this report) is
    refused, naming both, before anything is planned."""
    claims: dict[str, str] = {}
    for r in (base, cand):
        alias = round_alias(r.name)
        for other in (claims.get(alias), state.alias_rounds.get(alias)):
            if other is not None and other != r.name:
                raise StageError(
                    f"round {r.name!r}: its alias @{alias} belongs to round {other!r}; give one of them another "
                    "name (a name of ASCII letters, digits, '_' and '-' is its own alias)"
                )
        claims[alias] = r.name


def held(state: RegistryState, alias: str) -> str:
    version = state.aliases[alias]
    if version is not None:
        return f"version {version.version}"
    if alias == CHAMPION and state.deleted_champion:
        return f"no version (version {state.deleted_champion[0]} was the champion and has been deleted)"
    return "no version"


def round_best(state: RegistryState, r: Round) -> tuple[ModelVersion | None, str]:
    """The round's best seed by validation accuracy (the first of a tie) that still has a version, described with
    what better ones lack."""
    lacking = []
    for rep in sorted(r.replicates, key=lambda rep: -rep.metrics["val_accuracy"]):
        run_id = rep.metrics["mlflow_run_id"]
        if run_id in state.versions:
            v = state.versions[run_id]
            better = f"; better by validation, but {', '.join(lacking)}" if lacking else ""
            return (
                v,
                f"version {v.version} ({rep.label}, validation accuracy {rep.metrics['val_accuracy']:.2%}{better})",
            )
        lacking.append(
            f"{rep.label}'s version was deleted"
            if run_id in state.deleted
            else f"{rep.label} registered no version (tracking.log_model off, or trained before registration)"
        )
    return None, "no seed has a version: " + ", ".join(lacking)


def plan_aliases(state: RegistryState, base: Round, cand: Round, passes: tuple[bool, bool], v: Verdict) -> Plan:
    """The aliases' moves and the report's lines saying what and why; nothing is moved here."""
    refuse_shared_aliases(state, base, cand)
    waiting = [r for r in (base, cand) if missing_seeds(r)]
    if waiting:
        missing = ", ".join(f"{r.name} {missing_seeds(r)}" for r in waiting)
        return Plan([], [f"- no alias moves until both rounds have their planned seeds (missing: {missing})"], False)
    moves, lines, best, claims = [], [], {}, []
    for side, r in zip(SIDES, (base, cand)):
        alias = round_alias(r.name)
        best[side], text = round_best(state, r)
        now = state.aliases[alias]
        if best[side] is not None and (now is None or now.version != best[side].version):
            moves.append((alias, best[side]))
            claims.append((alias, r.name))
            lines.append(f"- @{alias} -> {text} (was {held(state, alias)})")
        else:
            lines.append(f"- @{alias} stays at " + (text if best[side] else f"{held(state, alias)}: {text}"))
    d = champion_decision(champion_side(state.champion_run, base, cand), passes, v, (base.name, cand.name))
    target = best.get(d.holder) if d.holder else None
    current = state.aliases[CHAMPION]
    if d.holder and target is None:
        lines.append(f"- @{CHAMPION} stays at {held(state, CHAMPION)}: {d.why}, but it has no registered version")
    elif target is not None and (current is None or current.version != target.version):
        moves.append((CHAMPION, target))
        lines.append(f"- @{CHAMPION} -> version {target.version} (was {held(state, CHAMPION)}): {d.why}")
    else:
        lines.append(f"- @{CHAMPION} stays at {held(state, CHAMPION)}: {d.why}")
    return Plan(moves, lines, d.tested, tuple(claims), comparison_key(base.name, cand.name))


def reuse_line(state: RegistryState, base: Round, cand: Round, v: Verdict, applied: bool) -> str:
    """What the decision spends of the test set: the comparison's index on it, its share of alpha and what is left."""
    earlier = state.earlier(base.name, cand.name)
    known = comparison_key(base.name, cand.name) in state.comparisons
    count = state.decisions + (applied and state.exists and not known)
    which = "decided before, so this report spends nothing more" if known else f"comparison {earlier + 1} on it"
    return (
        f"- the test set (digest {state.digest}) has decided {count} comparison(s) of {state.name}; this one is "
        f"{which}: its verdict is read at alpha = {v.alpha:g}, leaving {v.alpha:g} for all the comparisons that "
        "follow on these test images (each spends half of what is left)"
        + ("" if applied else "; this read-only report records nothing")
    )
