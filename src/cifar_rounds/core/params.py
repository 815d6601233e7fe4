"""The validated `params.yaml`: the only code that reads or writes it.

One sub-model per section, `extra="forbid"` everywhere, every field with its
meaning and unit, and no defaults: `params.yaml` holds every working value, so a
missing field is an error that names it, never a silent default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cifar_rounds.core.errors import ParamsError, short_repr
from cifar_rounds.core.inputs import FileArgumentError, read_text
from cifar_rounds.core.urls import passwordless
from cifar_rounds.core.yamlio import flatten, read_yaml, unflatten

PARAMS_FILE = Path("params.yaml")
CIFAR10_TRAIN_SIZE = 50_000
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed accepts
# a store's URL (MLflow's, Optuna's): logged, committed and printed, so refused with a password in it
StoreUrl = Annotated[str, StringConstraints(min_length=1), AfterValidator(passwordless)]
# a round's name: what MLflow accepts in an alias (so the name is its alias as it is), in ASCII (so it reaches
# DVC's -S parser and git refs as typed)
ROUND_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    url: str = Field(
        min_length=1,
        description="Where the CIFAR-10 python archive comes from: http(s):// or file:// URL, or a local path.",
    )
    md5: str = Field(pattern=r"^[0-9a-f]{32}$", description="MD5 hex digest the archive must have.")
    val_size: int = Field(
        ge=10,
        lt=CIFAR10_TRAIN_SIZE,
        description="Training images held out for validation (stratified), images; at least one per class.",
    )
    seed: int = Field(
        ge=0, le=MAX_SEED, description="Seed of the train/validation split, which a round's replicates share."
    )


class ModelParams(Section):
    width: int = Field(
        ge=1, le=512, description="Base width of ResNet-18 (channels of the first stage); 64 is the standard."
    )


class TrainParams(Section):
    seed: int = Field(
        ge=0,
        le=MAX_SEED,
        description="Seed of this replicate: weight init, batch order, augmentation draws, diagnostic probes.",
    )
    learning_rate: float = Field(gt=0, le=10, description="Initial SGD learning rate.")
    momentum: float = Field(ge=0, lt=1, description="SGD momentum coefficient.")
    nesterov: bool = Field(description="Use Nesterov momentum.")
    weight_decay: float = Field(ge=0, lt=1, description="L2 weight decay coefficient (SGD's).")
    batch_size: int = Field(ge=1, description="Global mini-batch size, images per optimizer step.")
    num_epochs: int = Field(ge=1, description="Maximum number of epochs.")
    lr_milestones: list[int] = Field(description="Epochs after which the learning rate is multiplied by lr_gamma.")
    lr_gamma: float = Field(gt=0, le=1, description="Learning-rate decay factor at each milestone.")
    patience: int = Field(ge=1, description="Epochs without improvement of `monitor` before stopping.")
    min_delta: float = Field(
        ge=0, allow_inf_nan=False, description="Least change of `monitor` that counts as an improvement (its unit)."
    )
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        description="Validation metric for early stopping and the best checkpoint."
    )
    random_crop: bool = Field(description="Random 32x32 crop from the image zero-padded by 4 pixels.")
    horizontal_flip: bool = Field(description="Random horizontal flip with probability 0.5.")
    eval_batch_size: int = Field(ge=1, description="Batch size for validation and test, images.")
    device: Literal["auto", "cpu", "cuda"] = Field(description="auto: CUDA when available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        description="auto: bf16 autocast where the hardware has bf16 units (CUDA from Ampere on, CPUs with "
        "AVX512-BF16 or AMX; about 2x faster than fp32), fp32 elsewhere (bf16 is emulated there, hence slower).",
    )
    compile: bool = Field(description="Compile the model with torch.compile.")
    sync_batchnorm: bool = Field(
        description="Under torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm)."
    )
    deterministic: bool = Field(description="Deterministic kernels (bit-for-bit reruns), no cudnn autotuning.")

    @field_validator("lr_milestones")
    @classmethod
    def _milestones_within_run(cls, m: list[int], info: ValidationInfo) -> list[int]:
        if any(b <= a for a, b in zip(m, m[1:])):
            raise ValueError(f"must be strictly increasing, got {short_repr(m)}")
        epochs = info.data.get("num_epochs")
        if m and epochs is not None and not (1 <= m[0] and m[-1] < epochs):
            raise ValueError(f"must lie in [1, num_epochs={epochs}), got {short_repr(m)}")
        return m


class TrackingParams(Section):
    experiment_name: str = Field(min_length=1, description="MLflow experiment.")
    round: str = Field(
        pattern=ROUND_NAME_PATTERN,
        description="The round this run belongs to (`rounds run` sets the name it gives the runs: the preset's, "
        "or -n's); the report groups replicates by it. ASCII letters, digits, '_' and '-', starting with a letter "
        "or digit: the name is also the round's registry alias and its DVC experiments' prefix, taken as typed.",
    )
    preset: str | None = Field(
        min_length=1,
        description="The preset in rounds/ this run started from (`rounds run` sets it); null: none.",
    )
    planned_seeds: int | None = Field(
        ge=1,
        description="Replicates (seeds) planned for this run's round (`rounds run --seeds N` sets N), so that the "
        "report can tell a round still missing seeds; null: none planned.",
    )
    run_name: str = Field(min_length=1, description="MLflow run name outside `dvc exp run` (which names it).")
    tracking_uri: StoreUrl | None = Field(
        description="MLflow tracking URI, without a password (a server's credentials come from "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD); unset: $MLFLOW_TRACKING_URI, else sqlite "
        "mlflow.db at the repo root.",
    )
    grad_norm_interval: int = Field(ge=1, description="Log the per-step gradient norm every this many optimizer steps.")
    log_model: bool = Field(description="Log the best model as an MLflow LoggedModel and register it as a version.")
    registered_model: str = Field(
        pattern=r"^[A-Za-z0-9][\w.-]*$",
        description="MLflow registered model (letters, digits, '.', '_', '-': it appears in models:/NAME@ALIAS) "
        "that each training run's best model becomes one version of; the round report moves its aliases.",
    )
    system_metrics_interval_s: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="While training, sample MLflow's system metrics (CPU, memory, disk, network; GPUs where "
        "nvidia-ml-py is installed) every this many seconds, seconds; 0: off.",
    )
    store_patience_s: float = Field(
        gt=0,
        allow_inf_nan=False,
        description="How long one write waits, with backoff, for a busy store (a locked sqlite file, a server "
        "not answering) before the stage stops with its checkpoint kept, seconds.",
    )


class DiagnosticsParams(Section):
    """Gradient noise scale and sharpness (see diagnostics.py); neither changes the training trajectory."""

    noise_scale: bool = Field(description="Estimate the simple gradient noise scale B_simple during training.")
    noise_interval: int = Field(ge=1, description="Measure the half-batch gradient every this many steps.")
    noise_ema: float = Field(ge=0, lt=1, description="EMA decay of the |G|^2 and tr(Sigma) estimates, per measurement.")
    sharpness: bool = Field(description="Measure the Hessian's top eigenvalue and trace at `sharpness_epochs`.")
    sharpness_epochs: list[int] = Field(
        description="Epochs to measure sharpness after; empty: each lr milestone and the last epoch."
    )
    sharpness_samples: int = Field(ge=1, description="Fixed, seeded subset of training images for the Hessian.")
    power_iterations: int = Field(ge=1, description="Most power-iteration steps for the top eigenvalue.")
    power_tolerance: float = Field(
        ge=0, lt=1, description="Power iteration stops once the eigenvalue changes by at most this fraction of itself."
    )
    hutchinson_samples: int = Field(ge=1, description="Rademacher probes for the Hessian trace.")


class SweepParams(Section):
    """Which Optuna trial this run is (set by `python -m cifar_rounds.search.sweep`); all null outside a sweep."""

    study: str | None = Field(min_length=1, description="Optuna study this run is a trial of; null: not a trial.")
    trial: int | None = Field(ge=0, description="The trial's number in the study.")
    storage: StoreUrl | None = Field(
        description="The study's storage URL, without a password (PostgreSQL's comes from PGPASSWORD or "
        "~/.pgpass); null: sqlite optuna.db at the repository root.",
    )

    @model_validator(mode="after")
    def _study_and_trial_together(self) -> SweepParams:
        if (self.study is None) != (self.trial is None):
            raise ValueError("sweep.study and sweep.trial: set both (a trial) or neither")
        return self


class ReportParams(Section):
    """Success criteria of a round (the founding analysis's), checked by `python -m cifar_rounds.analysis.report`."""

    min_test_accuracy: float = Field(ge=0, le=1, description="Test accuracy must exceed this (fraction).")
    max_train_test_gap: float = Field(
        ge=0, le=1, description="Train minus test accuracy must stay below this (fraction)."
    )
    max_val_loss_rise: float = Field(
        ge=0, description="Stable validation loss: at the stop at most this fraction above its minimum."
    )
    significance: float = Field(
        gt=0,
        lt=1,
        description="Significance level: a change in test accuracy counts as real below this p-value "
        "(the configuration verdict over seeds, or McNemar with one seed).",
    )


class Params(Section):
    data: DataParams
    model: ModelParams
    train: TrainParams
    tracking: TrackingParams
    diagnostics: DiagnosticsParams
    report: ReportParams
    sweep: SweepParams

    @model_validator(mode="after")
    def _sharpness_epochs_within_run(self) -> Params:
        epochs, last = self.diagnostics.sharpness_epochs, self.train.num_epochs
        if any(not 1 <= e <= last for e in epochs):
            raise ValueError(
                f"diagnostics.sharpness_epochs: must lie in [1, train.num_epochs={last}], got {short_repr(epochs)}"
            )
        return self

    def flat(self) -> dict[str, object]:
        """Every field under the dotted name `dvc params diff` prints."""
        return flatten(self.model_dump())

    def digest(self, *sections: str) -> str:
        """Short hash of the given sections (all when none), to tell runs apart."""
        dump = self.model_dump()
        chosen = {k: dump[k] for k in (sections or dump)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def all_field_names() -> list[str]:
    """Every dotted field name the params file must hold."""
    return [f"{section}.{name}" for section, f in Params.model_fields.items() for name in f.annotation.model_fields]


def nearest_field(name: str) -> str:
    """' (did you mean X?)' for the closest valid field name, or '' if none is close."""
    close = difflib.get_close_matches(name, all_field_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(error: ValidationError, path: Path) -> str:
    # an unknown key first: a misspelt field is also reported missing under its right name
    first = min(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    field = ".".join(str(p) for p in first["loc"])
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key {short_repr(field)}{nearest_field(field)}{more}"
    if first["type"] == "missing":
        return f"{path}: {field}: missing; every field must be set (see its description in params.py){more}"
    got = "" if first["type"] == "value_error" else f" (got {short_repr(first['input'])})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: {field + ': ' if field else ''}{message}{got}{more}"


def parse_params(raw: object, path: Path = PARAMS_FILE) -> Params:
    """Validate an already-loaded mapping; raise ParamsError with a one-line message."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error, path)) from None


def with_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """A validated copy with dotted-name values replaced ({"train.num_epochs": 3})."""
    flat = params.flat()
    unknown = sorted(set(overrides) - set(flat))
    if unknown:
        raise ParamsError(f"unknown parameter {short_repr(unknown[0])}{nearest_field(unknown[0])}")
    return parse_params(unflatten({**flat, **overrides}), Path("overrides"))


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = read_text(Path(path), "a params file (YAML sections, as params.yaml)")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except FileArgumentError as error:
        raise ParamsError(str(error)) from None
    return params_from_text(text, Path(path))


def params_from_text(text: str, source: Path) -> Params:
    """Validate params.yaml content read from elsewhere (a git revision, an MLflow artifact)."""
    return parse_params(read_yaml(text, source), source)


def dump_params(params: Params, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
