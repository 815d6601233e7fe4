"""A sweep's pruners: when a trial stops early, decided inside its training from the epochs it and the study's other
trials reported. A sweep file's `pruner:` section; the study keeps it, and each trial's training builds it from there.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PrunerPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoPruner(PrunerPart):
    kind: Literal["none"]

    def build(self):
        import optuna

        return optuna.pruners.NopPruner()


class MedianPruner(PrunerPart):
    kind: Literal["median"]
    startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned.")
    warmup_epochs: int = Field(1, ge=0, description="Epochs every trial trains before it may be pruned.")

    def build(self):
        import optuna

        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)


class HalvingPruner(PrunerPart):
    kind: Literal["successive_halving"]
    min_epochs: int = Field(1, ge=1, description="Epochs of the first rung.")
    reduction_factor: int = Field(3, ge=2, description="1/this of the trials go on at each rung.")

    def build(self):
        import optuna

        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=self.min_epochs, reduction_factor=self.reduction_factor
        )


class ThresholdPruner(PrunerPart):
    """A trial whose objective at an epoch lies beyond a fixed limit stops, whatever the other trials did: a
    trial still at chance (val_accuracy 0.1 on CIFAR-10's ten classes) or diverged after its warm-up."""

    kind: Literal["threshold"]
    lower: float | None = Field(None, description="Stop a trial whose objective falls below this (val_accuracy).")
    upper: float | None = Field(None, description="Stop a trial whose objective rises above this (val_loss).")
    warmup_epochs: int = Field(1, ge=0, description="Epochs every trial trains before it may be pruned.")

    @model_validator(mode="after")
    def _a_limit(self) -> ThresholdPruner:
        if self.lower is None and self.upper is None:
            raise ValueError("a threshold pruner needs a lower or an upper limit")
        if self.lower is not None and self.upper is not None and self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self

    def build(self):
        import optuna

        return optuna.pruners.ThresholdPruner(lower=self.lower, upper=self.upper, n_warmup_steps=self.warmup_epochs)


Pruner = Annotated[NoPruner | MedianPruner | HalvingPruner | ThresholdPruner, Field(discriminator="kind")]
