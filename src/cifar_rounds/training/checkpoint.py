"""The training state: what `last.pt` and `best.pt` hold, and their atomic save, safe load and restore.

`last.pt` holds everything a run needs to continue bit for bit: weights, optimizer,
schedule, random generators and `Progress` (the epoch reached, the history, early
stopping, the MLflow run, the noise-scale averages). A run continues only from a
state of the same data (params and split content), model, training and sweep params
and round (a sweep trial or a round never takes another's checkpoint, finished or not, for its own);
other sections may change between a kill and a resume, and the change is recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.names import BEST_CHECKPOINT, LAST_CHECKPOINT
from cifar_rounds.core.params import Params

IDENTITY_SECTIONS = ("model", "train", "sweep")  # a change here (or in the split's bytes) starts a fresh run


@dataclass
class Progress:
    """What resumes a run besides the tensors."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopper: dict = field(default_factory=dict)
    run_id: str | None = None
    finished: bool = False  # training is over (last epoch or early stop)
    pruned: bool = False  # it ended because the sweep's pruner stopped this trial
    finalized: bool = False  # and so is its final logging (model, artifacts), and the run has ended
    last_grad_norm_steps: dict[int, float] = field(default_factory=dict)  # the last epoch's logged series
    noise: dict = field(default_factory=dict)  # NoiseScale's moving averages
    settings: dict[str, str] = field(default_factory=dict)  # digests of the sections that may change on resume
    conditions: dict[str, str] = field(default_factory=dict)  # run conditions, for a rebuilt summary
    placement: dict[str, str] = field(default_factory=dict)  # the last training process's device and its sharing


@dataclass(frozen=True)
class Outputs:
    """The train stage's files."""

    models: Path
    history: Path
    summary: Path

    @property
    def last(self) -> Path:
        return self.models / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.models / BEST_CHECKPOINT


@dataclass(frozen=True)
class Resume:
    state: dict | None  # the checkpoint to continue from; None: start fresh
    superseded_run: str | None = None  # the MLflow run of a checkpoint that these params replace


def run_identity(params: Params, split_digest: str) -> str:
    """What a resumed run must share with the killed one: model, train and sweep params (which trial it is),
    its round (a round's runs are its own, never another round's under a new name), and the split's bytes
    (which the data params only describe: a re-split with the same params may differ)."""
    text = params.digest(*IDENTITY_SECTIONS) + params.tracking.round + split_digest
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a checkpoint cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"{path}: no checkpoint; run the train stage first") from None
    except Exception as error:  # UnpicklingError, truncated zip, ...: all mean "not a usable checkpoint"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(f"{path}: not a loadable checkpoint ({first_line}); delete it to start over") from None


def find_resume(path: Path, identity: str) -> Resume:
    """The last checkpoint if it belongs to this run (finished or not); says why not."""
    if not path.exists():
        return Resume(None)
    state = load_checkpoint(path)
    if state.get("params_digest") != identity:
        print(
            f"train: {path} was made for another round or sweep trial, or with other data, model or train params; "
            "starting fresh"
        )
        return Resume(None, state.get("progress", {}).get("run_id"))
    return Resume(state)


def training_state(
    net: nn.Module, optimizer, scheduler, generator: torch.Generator, progress: Progress, identity: str
) -> dict:
    return {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "progress": asdict(progress),
        "params_digest": identity,
    }


def restore(state: dict, net: nn.Module, optimizer, scheduler, generator: torch.Generator) -> Progress:
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def best_weights(model_state: dict, epoch: int, width: int) -> dict:
    """What `best.pt` holds: the weights of the best epoch."""
    return {"model": model_state, "epoch": epoch, "width": width}


def load_weights(path: Path, model: nn.Module, width: int) -> None:
    """Load `best.pt`-style weights into `model`, refusing a checkpoint of another width by name."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("width", width) != width:
        raise StageError(
            f"{path}: made at model.width {checkpoint['width']}, but params.yaml says {width}; "
            "retrain (dvc repro) or set model.width back"
        )
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise StageError(f"{path}: does not fit this model ({first}); retrain with dvc repro") from None
