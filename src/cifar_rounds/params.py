"""The validated `params.yaml`: the only code that reads or writes it.

One sub-model per section, `extra="forbid"` everywhere, every field with its
meaning and unit. The defaults are the seed's round 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

PARAMS_FILE = Path("params.yaml")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_SIZE = 50_000


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    url: str = Field(
        CIFAR10_URL,
        min_length=1,
        description="Where the CIFAR-10 python archive comes from: http(s):// or file:// URL, or a local path.",
    )
    md5: str = Field(
        CIFAR10_MD5, pattern=r"^[0-9a-f]{32}$", description="MD5 hex digest the archive must have."
    )
    val_size: int = Field(
        5000,
        ge=10,
        lt=CIFAR10_TRAIN_SIZE,
        description="Training images held out for validation (stratified), images; at least one per class.",
    )
    seed: int = Field(
        0, ge=0, description="The one seed: the split, weight init, shuffling and augmentation."
    )


class ModelParams(Section):
    width: int = Field(
        64, ge=1, le=512, description="Base width of ResNet-18 (channels of the first stage); 64 is the standard."
    )


class TrainParams(Section):
    learning_rate: float = Field(0.05, gt=0, le=10, description="Initial SGD learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum coefficient.")
    nesterov: bool = Field(False, description="Use Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, lt=1, description="L2 weight decay coefficient (SGD's).")
    batch_size: int = Field(96, ge=1, description="Global mini-batch size, images per optimizer step.")
    num_epochs: int = Field(250, ge=1, description="Maximum number of epochs.")
    lr_milestones: list[int] = Field(
        [60, 120, 160], description="Epochs after which the learning rate is multiplied by lr_gamma."
    )
    lr_gamma: float = Field(0.2, gt=0, le=1, description="Learning-rate decay factor at each milestone.")
    patience: int = Field(35, ge=1, description="Epochs without improvement of `monitor` before stopping.")
    min_delta: float = Field(
        0.0005, ge=0, description="Least change of `monitor` that counts as an improvement (its unit)."
    )
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss", description="Validation metric for early stopping and the best checkpoint."
    )
    random_crop: bool = Field(True, description="Random 32x32 crop from the image zero-padded by 4 pixels.")
    horizontal_flip: bool = Field(True, description="Random horizontal flip with probability 0.5.")
    eval_batch_size: int = Field(1000, ge=1, description="Batch size for validation and test, images.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast where the hardware has bf16 units (CUDA from Ampere on, CPUs with "
        "AVX512-BF16 or AMX; about 2x faster than fp32), fp32 elsewhere (bf16 is emulated there, hence slower).",
    )
    compile: bool = Field(False, description="Compile the model with torch.compile.")
    sync_batchnorm: bool = Field(
        False, description="Under torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm)."
    )
    deterministic: bool = Field(
        False, description="Deterministic kernels (bit-for-bit reruns), no cudnn autotuning."
    )

    @field_validator("lr_milestones")
    @classmethod
    def _milestones_within_run(cls, m: list[int], info: ValidationInfo) -> list[int]:
        if any(b <= a for a, b in zip(m, m[1:])):
            raise ValueError(f"must be strictly increasing, got {m}")
        epochs = info.data.get("num_epochs")
        if m and epochs is not None and not (1 <= m[0] and m[-1] < epochs):
            raise ValueError(f"must lie in [1, num_epochs={epochs}), got {m}")
        return m


class TrackingParams(Section):
    experiment_name: str = Field("cifar-rounds", min_length=1, description="MLflow experiment.")
    run_name: str = Field(
        "workspace", min_length=1, description="MLflow run name outside `dvc exp run` (which names it)."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the repo root.",
    )
    grad_norm_interval: int = Field(
        50, ge=1, description="Log the per-step gradient norm every this many optimizer steps."
    )
    log_model: bool = Field(True, description="Log the best model as an MLflow model.")


class DiagnosticsParams(Section):
    """Gradient noise scale and sharpness (see diagnostics.py); neither changes the training trajectory."""

    noise_scale: bool = Field(True, description="Estimate the simple gradient noise scale B_simple during training.")
    noise_interval: int = Field(20, ge=1, description="Measure the half-batch gradient every this many steps.")
    noise_ema: float = Field(0.95, ge=0, lt=1, description="EMA decay of the |G|^2 and tr(Sigma) estimates, per measurement.")
    sharpness: bool = Field(True, description="Measure the Hessian's top eigenvalue and trace at `sharpness_epochs`.")
    sharpness_epochs: list[int] = Field(
        [], description="Epochs to measure sharpness after; empty: each lr milestone and the last epoch."
    )
    sharpness_samples: int = Field(512, ge=1, description="Fixed, seeded subset of training images for the Hessian.")
    power_iterations: int = Field(20, ge=1, description="Power-iteration steps for the top eigenvalue.")
    hutchinson_samples: int = Field(10, ge=1, description="Rademacher probes for the Hessian trace.")


class ReportParams(Section):
    """Success criteria of a round (the seed's), checked by `python -m cifar_rounds.report`."""

    min_test_accuracy: float = Field(0.88, ge=0, le=1, description="Test accuracy must exceed this (fraction).")
    max_train_test_gap: float = Field(
        0.08, ge=0, le=1, description="Train minus test accuracy must stay below this (fraction)."
    )
    max_val_loss_rise: float = Field(
        0.10, ge=0, description="Stable validation loss: at the stop at most this fraction above its minimum."
    )
    significance: float = Field(
        0.05, gt=0, lt=1, description="McNemar p-value below which a change in test accuracy counts as real."
    )


class Params(Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    diagnostics: DiagnosticsParams = DiagnosticsParams()
    report: ReportParams = ReportParams()

    def flat(self) -> dict[str, object]:
        """Every field under the dotted name `dvc params diff` prints."""
        return flatten(self.model_dump())

    def digest(self, *sections: str) -> str:
        """Short hash of the given sections (all when none), to tell runs apart."""
        dump = self.model_dump()
        chosen = {k: dump[k] for k in (sections or dump)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _describe(error: ValidationError, path: Path) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{field}' (check its spelling against params.py)"
    got = "" if first["type"] in ("missing", "value_error") else f" (got {first['input']!r})"
    message = first["msg"].removeprefix("Value error, ")
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{path}: {field}: {message}{got}{more}"


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
        raise ParamsError(f"unknown parameter {unknown[0]!r}")
    return parse_params(unflatten({**flat, **overrides}), Path("overrides"))


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    return params_from_text(text, Path(path))


def params_from_text(text: str, source: Path) -> Params:
    """Validate params.yaml content read from elsewhere (a git revision, an MLflow artifact)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    return parse_params(raw, source)


def dump_params(params: Params, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))


def main() -> None:
    """`python -m cifar_rounds.params [FILE]`: validate a params file, exit non-zero if bad."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=PARAMS_FILE)
    args = parser.parse_args()
    try:
        load_params(args.path)
    except ParamsError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{args.path}: valid")


if __name__ == "__main__":
    main()
