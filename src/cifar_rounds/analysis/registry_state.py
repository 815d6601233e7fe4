"""What the registered model records for the round report's decisions, read once and written after: the
aliases and their rounds, the champion, and per test set the comparisons decided on it.

Each comparison of two rounds decided on one test set (by the digest of its images) is counted
once, however often its report runs, and keeps its index: its share of alpha
(`criteria.decision_alpha`) is spent once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.replicates import Round
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

# registered-model tags: the champion last set (to name it once MLflow deletes it with its version),
# per test set (by digest) how many comparisons it has decided and each one's index among them
CHAMPION_VERSION_TAG, CHAMPION_RUN_TAG = "champion.version", "champion.run_id"
DECISIONS_TAG = "test_set_decisions.{digest}"
COMPARISON_TAG = "test_set_comparison.{digest}.{key}"
# the round whose alias it is: names that MLflow's alias characters cannot tell apart (r.2, r-2) share an alias
ALIAS_ROUND_TAG = "alias.{alias}.round"


def comparison_key(a: str, b: str) -> str:
    """The comparison of rounds `a` and `b`, either way round, in the characters a tag name takes."""
    return hashlib.sha256("\n".join(sorted((a, b))).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RegistryState:
    """What the registered model holds for the two rounds, read once."""

    name: str
    exists: bool
    versions: dict[str, ModelVersion]  # run id -> the version it registered
    deleted: frozenset[str]  # run ids whose version was deleted (their logged model remains)
    aliases: dict[str, ModelVersion | None]  # each round's alias (and @champion) -> its version
    deleted_champion: tuple[str, str] | None  # (version, run id) of a champion MLflow deleted with its version
    decisions: int  # comparisons decided on this test set so far
    digest: str
    alias_rounds: dict[str, str] = field(default_factory=dict)  # round alias -> the round that moved it
    comparisons: dict[str, int] = field(default_factory=dict)  # comparison key -> its index on this test set

    def earlier(self, a: str, b: str) -> int:
        """How many comparisons this test set decided before that of rounds `a` and `b`: its own index when it was
        decided before (a report run again spends nothing more), else all of them."""
        return self.comparisons.get(comparison_key(a, b), self.decisions)

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
    prefix = COMPARISON_TAG.format(digest=digest, key="")
    decided = {k.removeprefix(prefix): int(v) for k, v in (tags or {}).items() if k.startswith(prefix)}
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
        decided,
    )


class Plan(NamedTuple):
    moves: list[tuple[str, ModelVersion]]  # (alias, the version it should point at)
    lines: list[str]
    tested: bool
    claims: tuple[tuple[str, str], ...] = ()  # (alias, round) of each round alias moved
    comparison: str = ""  # the comparison's key (comparison_key), counted once it is decided


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
    if plan.tested and state.exists and plan.comparison not in state.comparisons:
        key = COMPARISON_TAG.format(digest=state.digest, key=plan.comparison)
        set_model_tag(client, state.name, key, str(state.decisions), patience)
        set_model_tag(client, state.name, DECISIONS_TAG.format(digest=state.digest), str(state.decisions + 1), patience)
    return done or [f"no alias of {state.name} moved"]
