"""Stage `train`: ResNet-18 with SGD, MultiStepLR and early stopping, from params.yaml.

Writes every epoch, atomically: the full training state (`last.pt`, enough to
resume bit for bit), the best weights (`best.pt`), the per-epoch history (a DVC
plot) and a summary. MLflow gets params, per-epoch metrics and gradient norms.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_rounds.cli import StageError, run_stage
from cifar_rounds.diagnostics import NoiseScale, SmallBatchProbe, sharpness
from cifar_rounds.distributed import World, close_world, from_main_rank, init_world, mean_over_ranks
from cifar_rounds.engine import EarlyStopping, EpochResult, evaluate, train_one_epoch
from cifar_rounds.files import atomic_path, write_json
from cifar_rounds.model import ResNet18
from cifar_rounds.params import PARAMS_FILE, ModelParams, Params, TrainParams, load_params
from cifar_rounds.pipeline import TrainBatches, eval_batches, normalize
from cifar_rounds.runtime import amp_dtype, configure_cpu, configure_determinism, run_conditions, select_device
from cifar_rounds.split import Split
from cifar_rounds.tracking import NullTracker, Tracker, terminated_on_exit

HISTORY_FIELDS = (
    "epoch", "learning_rate", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "train_val_accuracy_gap", "grad_norm_mean", "epoch_time_s", "images_per_s",
    "noise_scale", "lambda_max", "hessian_trace", "stability_bound",  # diagnostics; blank when off or not due
)


def build_model(model_params: ModelParams, num_classes: int, device: torch.device) -> nn.Module:
    model = ResNet18(num_classes=num_classes, width=model_params.width)
    return model.to(device, memory_format=torch.channels_last)


def build_optimizer(model: nn.Module, tp: TrainParams) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    optimizer = torch.optim.SGD(
        model.parameters(), lr=tp.learning_rate, momentum=tp.momentum,
        nesterov=tp.nesterov, weight_decay=tp.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, tp.lr_milestones, tp.lr_gamma)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Progress:
    """What resumes a run besides the tensors: the epoch reached, history, early stopping."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopper: dict = field(default_factory=dict)
    run_id: str | None = None
    finished: bool = False
    last_grad_norm_steps: dict[int, float] = field(default_factory=dict)  # the last epoch's logged series
    noise: dict = field(default_factory=dict)  # NoiseScale's moving averages


def training_state(net, optimizer, scheduler, generator, progress: Progress, digest: str) -> dict:
    return {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "progress": asdict(progress),
        "params_digest": digest,
    }


def resumable_state(path: Path, digest: str) -> dict | None:
    """The last checkpoint if it belongs to these params and did not finish; says why not."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if state.get("params_digest") != digest:
        print(f"train: {path} was made with other params; starting fresh")
        return None
    if state["progress"]["finished"]:
        print(f"train: {path} is a finished run; starting a new one")
        return None
    print(f"train: resuming from {path} after epoch {state['progress']['epoch']}")
    return state


def load_checkpoint(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a checkpoint cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, truncated zip, ...: all mean "not a usable checkpoint"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(f"{path}: not a loadable checkpoint ({first_line}); delete it to start over") from None


def restore(state: dict, net, optimizer, scheduler, generator) -> Progress:
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def progress_bar(iterable, total: int, desc: str):
    """A tqdm bar over batches on a terminal; the bare iterable elsewhere (epoch lines are printed instead)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def epoch_bar(total: int, done: int, world: World):
    """A tqdm bar over epochs on rank 0's terminal; None elsewhere."""
    if not (sys.stderr.isatty() and world.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="epochs", unit="epoch", dynamic_ncols=True)


def step_series(result: EpochResult, epoch: int, steps: int, interval: int) -> dict[int, float]:
    """The per-step gradient norms at global steps divisible by `interval`."""
    first = (epoch - 1) * steps
    return {first + i + 1: v for i, v in enumerate(result.step_grad_norms) if (first + i + 1) % interval == 0}


def log_epoch(tracker: Tracker, record: dict, series: dict[int, float]) -> None:
    tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, int(record["epoch"]), {"grad_norm_step": series})


def backfill(tracker: Tracker, progress: Progress) -> None:
    """After a kill between checkpoint and logging, log the checkpointed epochs MLflow lacks."""
    logged = tracker.last_step("train_loss")
    for record in progress.history:
        if record["epoch"] > logged:
            last = record["epoch"] == progress.epoch
            log_epoch(tracker, record, progress.last_grad_norm_steps if last else {})


def epoch_record(epoch: int, lr: float, result: EpochResult, val: dict, seconds: float, images: int) -> dict:
    m = result.metrics
    return {
        "epoch": epoch, "learning_rate": lr, **m, **val,
        "train_val_accuracy_gap": m["train_accuracy"] - val["val_accuracy"],
        "epoch_time_s": seconds, "images_per_s": images / seconds,
    }


@dataclass(frozen=True)
class Outputs:
    models: Path
    history: Path
    summary: Path

    @property
    def last(self) -> Path:
        return self.models / "last.pt"

    @property
    def best(self) -> Path:
        return self.models / "best.pt"


@dataclass
class Trainer:
    """Everything one epoch needs, built once."""

    net: nn.Module  # the module whose state is saved
    model: nn.Module  # what runs: `net`, or its compiled form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    batches: TrainBatches  # global batches; this rank trains on its shard of each
    val: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    dtype: torch.dtype | None
    world: World
    probe: SmallBatchProbe | None
    sharpness_set: tuple[torch.Tensor, torch.Tensor] | None  # fixed training images for the Hessian


def wrap_for_world(net: nn.Module, tp: TrainParams, device: torch.device, world: World) -> nn.Module:
    """DDP over the process group (with SyncBatchNorm if asked), then torch.compile if asked."""
    if tp.sync_batchnorm and device.type != "cuda":
        raise StageError("train.sync_batchnorm: PyTorch's SyncBatchNorm runs on CUDA devices only")
    model = net
    if world.size > 1:
        if tp.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if tp.compile else model


def build_trainer(params: Params, split: Split, device: torch.device, world: World) -> Trainer:
    tp = params.train
    if tp.batch_size % world.size:
        raise StageError(f"train.batch_size: {tp.batch_size} (the global batch) must divide by the {world.size} processes")
    configure_determinism(tp.deterministic)
    torch.manual_seed(params.data.seed)
    net = build_model(params.model, len(split.label_names), device)
    model = wrap_for_world(net, tp, device, world)  # SyncBatchNorm shares `net`'s parameters
    optimizer, scheduler = build_optimizer(net, tp)
    to_dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    batches = TrainBatches(to_dev(split.train_images), to_dev(split.train_labels), tp.batch_size, tp.random_crop, tp.horizontal_flip)
    if len(batches) == 0:
        raise StageError(f"train.batch_size: {tp.batch_size} exceeds the {len(split.train_labels)} training images")
    dp = params.diagnostics
    return Trainer(
        net, model, optimizer, scheduler, torch.Generator().manual_seed(params.data.seed), batches,
        (to_dev(split.val_images), to_dev(split.val_labels)), device, amp_dtype(tp.precision, device), world,
        SmallBatchProbe(net, dp.noise_interval) if dp.noise_scale else None,
        sharpness_subset(split, dp.sharpness_samples, params.data.seed, device) if dp.sharpness else None,
    )


def sharpness_subset(split: Split, n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same seeded, un-augmented training images at every measurement."""
    pick = torch.randperm(len(split.train_labels), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    images = normalize(torch.from_numpy(split.train_images[pick]).to(device))
    return images, torch.from_numpy(split.train_labels[pick]).to(device)


def sharpness_due(epoch: int, finished: bool, params: Params) -> bool:
    epochs = params.diagnostics.sharpness_epochs or params.train.lr_milestones
    return finished or epoch in epochs


def run_epoch(t: Trainer, epoch: int, tp: TrainParams) -> tuple[dict, EpochResult]:
    """Train one epoch, validate, step the schedule; the epoch's record."""
    lr = t.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    stream = progress_bar(t.batches.epoch(t.generator, t.world.shard), len(t.batches), f"epoch {epoch}")
    result = train_one_epoch(t.model, t.optimizer, stream, len(t.batches), t.device, t.dtype,
                             probe=t.probe, global_batch=tp.batch_size)
    seconds = time.perf_counter() - start
    result = reduce_over_ranks(result, t.world)
    if result.first_bad_step is not None:
        raise StageError(
            f"loss became non-finite at epoch {epoch}, step {result.first_bad_step + 1} "
            f"(learning rate {lr:g}); the last good checkpoint is kept"
        )
    val_x, val_y = t.val
    # the plain module: no DDP collectives (or recompilation) for evaluation
    val = evaluate(t.net, eval_batches(val_x, val_y, tp.eval_batch_size), val_y, t.device, t.dtype)
    t.scheduler.step()
    record = epoch_record(epoch, lr, result, val, seconds, len(t.batches) * tp.batch_size)
    return from_main_rank(record, t.world), result


def reduce_over_ranks(result: EpochResult, world: World) -> EpochResult:
    """Train loss and accuracy over the global batch; a non-finite loss on any rank counts.

    Gradient norms need nothing: DDP's gradients are already all-reduced.
    """
    if world.size == 1:
        return result
    m = result.metrics
    loss, accuracy, bad = mean_over_ranks(
        [m["train_loss"], m["train_accuracy"], float(result.first_bad_step is not None)], world
    )
    metrics = {**m, "train_loss": loss, "train_accuracy": accuracy}
    first_bad = (result.first_bad_step or 0) if bad else None
    # each rank's half-batch norm is an independent small-batch sample: their mean is too
    small = mean_over_ranks([s for s, *_ in result.noise_samples], world)
    samples = [(s, *rest) for s, (_, *rest) in zip(small, result.noise_samples)]
    return EpochResult(metrics, result.step_grad_norms, first_bad, samples)


def diagnose(t: Trainer, params: Params, result: EpochResult, noise: NoiseScale, lr: float, due: bool) -> dict:
    """The epoch's noise scale (moving averages updated) and, when due, sharpness."""
    out = {}
    for sample in result.noise_samples:
        noise.update(*sample)
    if noise.updates:
        out.update(noise_scale=noise.b_simple, noise_g_sq=noise.g_sq, noise_trace_sigma=noise.trace_sigma)
    if t.sharpness_set is not None and due:
        dp = params.diagnostics
        out.update(sharpness(t.net, *t.sharpness_set, dp.power_iterations, dp.hutchinson_samples, params.data.seed))
        out["stability_bound"] = 2 / lr  # gradient descent diverges along directions sharper than this
    return out


def fit(params: Params, split: Split, out: Outputs, device: torch.device, world: World = World()) -> dict:
    """Train to the end or early stop, checkpointing every epoch; returns the summary.

    Under torchrun every rank runs this; only rank 0 writes files and logs.
    """
    tp, digest = params.train, params.digest("data", "model", "train")
    t = build_trainer(params, split, device, world)
    state = resumable_state(out.last, digest)
    progress = restore(state, t.net, t.optimizer, t.scheduler, t.generator) if state else Progress()
    stopper = EarlyStopping(**progress.stopper) if progress.stopper else EarlyStopping(tp.monitor, tp.patience, tp.min_delta)
    noise = NoiseScale(**progress.noise) if progress.noise else NoiseScale(params.diagnostics.noise_ema)
    tracker = Tracker.start(params, device, progress.run_id) if world.is_main else NullTracker()
    tracker.log_artifact(PARAMS_FILE)  # the round's exact params, for reports built from MLflow alone
    progress.run_id = tracker.run_id
    bar = epoch_bar(tp.num_epochs, progress.epoch, world)
    with terminated_on_exit(tracker):
        backfill(tracker, progress)
        while not progress.finished:
            epoch = progress.epoch + 1
            record, result = run_epoch(t, epoch, tp)
            improved = stopper.update(record[tp.monitor], epoch)
            progress.finished = stopper.should_stop or epoch == tp.num_epochs
            if world.is_main:  # rank 0's record is every rank's; only it needs the diagnostics
                record.update(diagnose(t, params, result, noise, record["learning_rate"], sharpness_due(epoch, progress.finished, params)))
            if improved and world.is_main:
                save_atomic({"model": t.net.state_dict(), "epoch": epoch, "width": params.model.width}, out.best)
            progress.epoch, progress.stopper, progress.noise = epoch, asdict(stopper), asdict(noise)
            progress.history.append(record)
            progress.last_grad_norm_steps = step_series(result, epoch, len(t.batches), params.tracking.grad_norm_interval)
            if world.is_main:
                # checkpoint first, then log: a kill in between is repaired by `backfill` on resume
                save_atomic(training_state(t.net, t.optimizer, t.scheduler, t.generator, progress, digest), out.last)
                write_history(progress.history, out.history)
                log_epoch(tracker, record, progress.last_grad_norm_steps)
                print_epoch(record, tp)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if stopper.should_stop:
            print(f"early stop: no {tp.monitor} improvement > {tp.min_delta} in {tp.patience} epochs")
        summary = {
            "best_epoch": stopper.best_epoch, "stopped_epoch": progress.epoch,
            "early_stopped": stopper.should_stop, "mlflow_run_id": tracker.run_id,
            **run_conditions(tp.precision, device),
        }
        if world.is_main:
            log_final(tracker, params, out, summary, len(split.label_names))
            write_json(summary, out.summary)
    return summary


def print_epoch(record: dict, tp: TrainParams) -> None:
    print(
        f"epoch {record['epoch']}/{tp.num_epochs} lr {record['learning_rate']:.4g} "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
        f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | {record['images_per_s']:.0f} img/s",
        flush=True,
    )


def log_final(tracker: Tracker, params: Params, out: Outputs, summary: dict, num_classes: int) -> None:
    """Checkpoints (named by epoch), the history and the best model as an MLflow model."""
    tracker.log_metrics({"best_epoch": summary["best_epoch"], "stopped_epoch": summary["stopped_epoch"]}, summary["stopped_epoch"])
    tracker.log_artifact(out.best, "checkpoints", f"best-epoch-{summary['best_epoch']:03d}.pt")
    tracker.log_artifact(out.last, "checkpoints", f"last-epoch-{summary['stopped_epoch']:03d}.pt")
    tracker.log_artifact(out.history)
    if params.tracking.log_model:
        best = build_model(params.model, num_classes, torch.device("cpu"))
        best.load_state_dict(load_checkpoint(out.best)["model"])
        # batch 2: torch.export specialises a batch dimension of size 1
        tracker.log_pytorch_model(best.eval(), torch.zeros(2, 3, 32, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="split stage's .npz")
    parser.add_argument("--models", type=Path, required=True, help="folder for best.pt and last.pt")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch history CSV (DVC plot)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: best/stopped epoch, MLflow run id")
    args = parser.parse_args()
    params = load_params()
    configure_cpu(params.model.width, select_device(params.train.device))  # before any parallel work
    world = init_world(select_device(params.train.device).type == "cuda")
    try:
        device = select_device(params.train.device, world.local_rank)
        split = Split.load(args.split)
        summary = fit(params, split, Outputs(args.models, args.history, args.summary), device, world)
    finally:
        close_world(world)
    if world.is_main:
        print(f"train: best epoch {summary['best_epoch']}, stopped after {summary['stopped_epoch']}")


if __name__ == "__main__":
    run_stage(main)
