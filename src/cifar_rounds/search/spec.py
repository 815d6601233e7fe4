"""A sweep file (`sweeps/*.yaml`): the search space for round N+1, validated like params.yaml.

It names the parameters to search by their dotted params.yaml names, each a float
or int range (optionally log-scaled) or a categorical choice; the fixed values, which
the trials run with and a promoted round keeps; the schedule, values that only shorten
the trials (epochs, milestones), which a promoted round does not keep; the objective (a
validation metric, never a test metric); the trial budget; the sampler with its seed;
and the pruner. `load_sweep` checks exactly what the trials get (params.yaml, the
baseline preset, the fixed values, the schedule, then each range end and choice)
against the `Params` model before any trial runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cifar_rounds.core.errors import short_repr
from cifar_rounds.core.params import ROUND_NAME_PATTERN, Params, ParamsError, StoreUrl, with_overrides
from cifar_rounds.core.yamlio import read_yaml
from cifar_rounds.training.pruners import MedianPruner, Pruner

SWEEPS_DIR = Path("sweeps")


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(Part):
    """A closed interval [low, high], sampled uniformly or, with `log`, log-uniformly."""

    log: bool = Field(False, description="Sample the logarithm uniformly (for rates and decays).")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"needs low < high (and low > 0 on a log scale), got [{self.low}, {self.high}]")
        return self

    def ends(self) -> list[float]:
        return [self.low, self.high]

    def contains(self, value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


class FloatRange(Range):
    type: Literal["float"]
    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


class IntRange(Range):
    type: Literal["int"]
    low: int = Field(description="Smallest value.")
    high: int = Field(description="Largest value.")

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def contains(self, value: object) -> bool:
        return isinstance(value, int) and super().contains(value)


def stored_choice(value: object) -> str:
    """A categorical value as the study stores it: Optuna keeps only scalars, so a list (lr_milestones) is JSON."""
    return json.dumps(value)


class Choice(Part):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1, description="The values to choose from (numbers, strings, lists).")

    def suggest(self, trial, name: str) -> Any:
        return json.loads(trial.suggest_categorical(name, [stored_choice(c) for c in self.choices]))

    def ends(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: object) -> bool:
        return value in self.choices


Dimension = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class Objective(Part):
    metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy",
        description="Validation metric a trial is judged by, at the epoch train.monitor selects as best (the "
        "checkpoint evaluation uses); never a test metric.",
    )
    direction: Literal["maximize", "minimize"] = Field("maximize", description="Whether larger or smaller is better.")

    @model_validator(mode="after")
    def _direction_fits(self) -> Objective:
        if (self.metric == "val_loss") != (self.direction == "minimize"):
            raise ValueError(f"{self.metric} is to be {'minimized' if self.metric == 'val_loss' else 'maximized'}")
        return self


class TpeSampler(Part):
    kind: Literal["tpe"]
    seed: int = Field(0, ge=0, description="Sampler seed: the same sweep file proposes the same trials.")

    def build(self, space: dict[str, Dimension], offset: int = 0):
        import optuna

        return optuna.samplers.TPESampler(seed=self.seed + offset)


class RandomSampler(Part):
    kind: Literal["random"]
    seed: int = Field(0, ge=0, description="Sampler seed.")

    def build(self, space: dict[str, Dimension], offset: int = 0):
        import optuna

        return optuna.samplers.RandomSampler(seed=self.seed + offset)


class GridSampler(Part):
    kind: Literal["grid"]
    seed: int = Field(0, ge=0, description="Seed of the order in which grid points are tried.")

    def build(self, space: dict[str, Dimension], offset: int = 0):
        import optuna  # the grid's order is fixed by the seed; points already tried are skipped by Optuna

        return optuna.samplers.GridSampler(
            {k: [stored_choice(c) for c in d.choices] for k, d in space.items()}, seed=self.seed
        )


Sampler = Annotated[TpeSampler | RandomSampler | GridSampler, Field(discriminator="kind")]


class Sweep(Part):
    study: str = Field(
        pattern=ROUND_NAME_PATTERN,
        description="Study name (a round name's characters); trials are the rounds and DVC experiments STUDY-t000, ...",
    )
    baseline: str = Field(description="Preset (rounds/NAME.yaml) the best trial is compared with.")
    trials: int = Field(ge=1, description="Trials to finish (complete, pruned or failed), the enqueued ones included.")
    storage: StoreUrl | None = Field(
        None,
        description="Optuna storage URL, without a password (PostgreSQL's comes from PGPASSWORD or ~/.pgpass); "
        "null: sqlite optuna.db at the repository root.",
    )
    enqueue: list[str] = Field(
        default_factory=list,
        description="Presets tried first, in this order (their values of the searched parameters).",
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="params.yaml values every trial gets and the promoted round keeps (the round's own configuration).",
    )
    schedule: dict[str, Any] = Field(
        default_factory=dict,
        description="values that only shorten the trials (e.g. train.num_epochs, train.lr_milestones, "
        "train.patience): the trials get them, over `fixed`; the promoted round does not.",
    )
    space: dict[str, Dimension] = Field(min_length=1, description="The parameters searched, by dotted name.")
    objective: Objective = Field(default_factory=Objective)
    sampler: Sampler = Field(default_factory=lambda: TpeSampler(kind="tpe"))
    pruner: Pruner = Field(default_factory=lambda: MedianPruner(kind="median"))

    @model_validator(mode="after")
    def _grid_needs_choices(self) -> Sweep:
        if isinstance(self.sampler, GridSampler) and not all(isinstance(d, Choice) for d in self.space.values()):
            raise ValueError("sampler.kind grid: every space entry must be categorical")
        for part, values in (("fixed", self.fixed), ("schedule", self.schedule)):
            overlap = sorted(set(values) & set(self.space))
            if overlap:
                raise ValueError(f"{overlap[0]} is both in {part} and searched")
        return self

    def encoded(self, key: str, value: object) -> object:
        """A value of a searched parameter as the study stores it."""
        return stored_choice(value) if isinstance(self.space[key], Choice) else value

    def decoded(self, stored: dict[str, object]) -> dict[str, object]:
        """A trial's stored values as params.yaml holds them."""
        return {k: json.loads(v) if isinstance(self.space[k], Choice) else v for k, v in stored.items()}

    def trial_values(self) -> dict[str, object]:
        """What every trial gets over the baseline preset: the fixed values, then the schedule."""
        return {**self.fixed, **self.schedule}

    def digest(self) -> str:
        """What makes two sweep files the same study: the space, the fixed values, the schedule and the objective."""
        chosen = self.model_dump(include={"space", "fixed", "schedule", "objective"})
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def load_sweep(path: Path, base: Params, preset: Callable[[str], dict[str, object]]) -> Sweep:
    """The validated sweep file, checked against exactly what its trials will get.

    That is `base` (params.yaml) with the baseline preset's values (`preset` reads a preset by
    name: analysis.rounds.load_preset) and the fixed values, then each range end or choice;
    and every enqueued preset's searched values must lie in the space.
    """
    raw = read_yaml(_read(path), path)
    if not isinstance(raw, dict):
        what = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ParamsError(f"{path}: {what}, not a sweep file (a mapping of study, baseline, trials, space, ...)")
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if str(p) not in ("float", "int", "categorical"))
        message = first["msg"].removeprefix("Value error, ")
        raise ParamsError(f"{path}: {where + ': ' if where else ''}{message}") from None
    check_space(sweep, base, preset(sweep.baseline), path)
    check_enqueued(sweep, {name: preset(name) for name in sweep.enqueue + [sweep.baseline]}, path)
    return sweep


def _read(path: Path) -> str:
    """The sweep file's text; a missing file, a folder or a binary file is one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: a folder, not a sweep file (YAML)") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (not UTF-8), not a sweep file (YAML)") from None
    except PermissionError:
        raise ParamsError(f"{path}: cannot be read (permission denied)") from None


def check_space(sweep: Sweep, base: Params, baseline: dict[str, object], path: Path) -> None:
    """What every trial starts from (`base`, the baseline preset's values, the fixed ones, the schedule) must be
    valid, and so must it be with each range end or choice; and so must the promoted round's start, without the
    schedule."""
    where = f"on baseline {sweep.baseline} with the fixed values and the schedule"
    try:
        with_overrides(base, {**baseline, **sweep.fixed})
        start = with_overrides(base, {**baseline, **sweep.trial_values()})
    except ParamsError as error:
        raise ParamsError(f"{path}: fixed/schedule: the values ({where}) are not valid: {error}") from None
    for name, dimension in sweep.space.items():
        for value in dimension.ends():
            try:
                with_overrides(start, {name: value})
            except ParamsError as error:
                raise ParamsError(
                    f"{path}: space.{name}: {short_repr(value)} is not a valid value {where} ({error})"
                ) from None


def check_enqueued(sweep: Sweep, presets: dict[str, dict[str, object]], path: Path) -> None:
    """An enqueued preset's values of the searched parameters must lie in the space (Optuna refuses others)."""
    for name, values in presets.items():
        for key, dimension in sweep.space.items():
            if key in values and not dimension.contains(values[key]):
                raise ParamsError(
                    f"{path}: enqueue: preset {name} has {key} = {short_repr(values[key])}, outside "
                    f"space.{key} {short_repr(dimension.ends())}; widen the space or drop the preset"
                )
