"""Which version the registered model's aliases point at: the decision, from the round report's measurements.

`@<round>` points at the round's best seed by validation accuracy that has a version (the test set
does not pick it). `@champion` comes from one round: with no champion, the better of the two rounds
that passes the success criteria and that the verdict does not call worse; with a champion from one
of the two, the other round takes it only when it passes and the configuration verdict says it
beats the champion's round. Aliases wait until both rounds have their planned seeds, and @champion
moves only with `MIN_CHAMPION_SEEDS` distinct seeds per side. The report only plans (`plan_aliases`);
`apply_plan` moves, records the champion and counts the decision on the registered model's tags.
`tracking.registry` moves what it is told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.criteria import MIN_CHAMPION_SEEDS, missing_seeds
from cifar_rounds.analysis.replicates import Round
from cifar_rounds.analysis.verdict import Verdict
from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.patience import patiently
from cifar_rounds.tracking.registry import (
    CHAMPION,
    alias_version,
    model_tags,
    ready_model_id,
    round_alias,
    run_version,
    set_alias,
    set_model_tag,
    version_exists,
)

Side = Literal["none", "baseline", "candidate", "other"]  # where the current champion comes from
SIDES: tuple[Side, Side] = ("baseline", "candidate")
# registered-model tags: the champion last set (to name it once MLflow deletes it with its version),
# and per test set (by digest) how many alias decisions it has informed
CHAMPION_VERSION_TAG, CHAMPION_RUN_TAG = "champion.version", "champion.run_id"
DECISIONS_TAG = "test_set_decisions.{digest}"
# the round whose alias it is: names that MLflow's alias characters cannot tell apart (r.2, r-2) share an alias
ALIAS_ROUND_TAG = "alias.{alias}.round"


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


def crowning(passes: tuple[bool, bool], v: Verdict, names: tuple[str, str]) -> Decision:
    """No champion yet: the better round by the difference of means (a tie keeps the baseline), if it passes;
    else the other one if it passes and the verdict does not call it worse."""
    first = 1 if v.difference > 0 else 0
    better = significantly_better(v)
    if passes[first]:
        return Decision(
            SIDES[first],
            f"there was no champion; {names[first]} is the better round ({verdict_text(v)}) and passes the "
            "success criteria",
            True,
        )
    other = 1 - first
    if passes[other] and better != first:
        return Decision(
            SIDES[other],
            f"there was no champion; {names[first]} does not pass the success criteria, {names[other]} passes and "
            f"the verdict does not call it worse ({verdict_text(v)})",
            True,
        )
    why = (
        "neither round passes the success criteria"
        if not passes[other]
        else f"{names[first]} does not pass the success criteria, and {names[other]}, which does, is worse"
    )
    return Decision(None, f"there is no champion: {why} ({verdict_text(v)})", True)


def champion_decision(side: Side, passes: tuple[bool, bool], v: Verdict, names: tuple[str, str]) -> Decision:
    """Which round @champion should come from, from measured facts only; `passes` and `names`: (baseline, candidate)."""
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
    if side == "none":
        return crowning(passes, v, names)
    holder = SIDES.index(side)
    challenger = 1 - holder
    if passes[challenger] and significantly_better(v) == challenger:
        return Decision(
            SIDES[challenger],
            f"{names[challenger]} passes the success criteria and its configuration beats {names[holder]}, the "
            f"champion's round ({verdict_text(v)})",
            True,
        )
    why = (
        f"the configuration verdict does not say {names[challenger]} beats {names[holder]}, the champion's round "
        f"({verdict_text(v)})"
        if passes[challenger]
        else f"{names[challenger]} does not pass the success criteria"
    )
    return Decision(side, f"{why}; the champion stays with {names[holder]}'s best seed", True)


@dataclass(frozen=True)
class RegistryState:
    """What the registered model holds for the two rounds, read once."""

    name: str
    exists: bool
    versions: dict[str, ModelVersion]  # run id -> the version it registered
    deleted: frozenset[str]  # run ids whose version was deleted (their logged model remains)
    aliases: dict[str, ModelVersion | None]  # each round's alias (and @champion) -> its version
    deleted_champion: tuple[str, str] | None  # (version, run id) of a champion MLflow deleted with its version
    decisions: int  # alias decisions this test set has informed so far
    digest: str
    alias_rounds: dict[str, str] = field(default_factory=dict)  # round alias -> the round that moved it

    @property
    def champion_run(self) -> str | None:
        """The run the champion comes from ("" for a version registered without a run); None: no champion."""
        champion = self.aliases[CHAMPION]
        return (champion.run_id or "") if champion else (self.deleted_champion or (None, None))[1]


def read_registry(client: MlflowClient, name: str, rounds: tuple[Round, Round], digest: str, patience: float):
    tags = model_tags(client, name, patience)
    versions, deleted = {}, set()
    retried = lambda what, fn: patiently(fn, what, patience)  # noqa: E731
    for rep in (rep for r in rounds for rep in r.replicates):
        run_id = rep.metrics["mlflow_run_id"]
        if (version := run_version(client, name, run_id, patience)) is not None:
            versions[run_id] = version
        elif ready_model_id(client, run_id, retried):
            deleted.add(run_id)
    alias_names = [round_alias(r.name) for r in rounds] + [CHAMPION]
    aliases = {a: alias_version(client, name, a, patience) for a in alias_names}
    claimed = {a: (tags or {}).get(ALIAS_ROUND_TAG.format(alias=a)) for a in alias_names}
    recorded = (tags or {}).get(CHAMPION_VERSION_TAG)
    gone = aliases[CHAMPION] is None and recorded and not version_exists(client, name, recorded, patience)
    return RegistryState(
        name,
        tags is not None,
        versions,
        frozenset(deleted),
        aliases,
        (recorded, tags[CHAMPION_RUN_TAG]) if gone else None,
        int((tags or {}).get(DECISIONS_TAG.format(digest=digest), 0)),
        digest,
        {a: r for a, r in claimed.items() if r is not None},
    )


class Plan(NamedTuple):
    moves: list[tuple[str, ModelVersion]]  # (alias, the version it should point at)
    lines: list[str]
    tested: bool
    claims: tuple[tuple[str, str], ...] = ()  # (alias, round) of each round alias moved


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
    return Plan(moves, lines, d.tested, tuple(claims))


def reuse_line(state: RegistryState, plan: Plan, applied: bool) -> str:
    count = state.decisions + (plan.tested and applied and state.exists)
    return (
        f"- the test set (digest {state.digest}) has informed {count} alias decision(s) of {state.name}"
        + ("" if applied else "; this read-only report adds none")
        + ": each reuse of the same test images for a decision adds to the chance of a lucky winner"
    )


def apply_plan(client: MlflowClient, state: RegistryState, plan: Plan, patience: float) -> list[str]:
    """Move the planned aliases, record the champion and count the decision; one line per move."""
    done = []
    for alias, version in plan.moves:
        set_alias(client, state.name, alias, version.version, patience)
        done.append(f"moved {state.name}@{alias} -> version {version.version}")
    for alias, round_name in plan.claims:
        set_model_tag(client, state.name, ALIAS_ROUND_TAG.format(alias=alias), round_name, patience)
    champion = dict(plan.moves).get(CHAMPION) or state.aliases[CHAMPION]
    if champion is not None:  # remembered, to name it once MLflow deletes it together with its version
        set_model_tag(client, state.name, CHAMPION_VERSION_TAG, champion.version, patience)
        set_model_tag(client, state.name, CHAMPION_RUN_TAG, champion.run_id or "", patience)
    if plan.tested and state.exists:
        key = DECISIONS_TAG.format(digest=state.digest)
        set_model_tag(client, state.name, key, str(state.decisions + 1), patience)
    return done or [f"no alias of {state.name} moved"]
