"""One epoch of the train stage: the parts it needs, built once, and what runs in it.

`build_trainer` assembles the model, optimisation, data and probes from the
validated params; `run_epoch` trains, validates and steps the schedule, and
returns the epoch's record (the same on every rank); `diagnose` adds the noise
scale and, when due, the sharpness.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import Params, TrainParams
from cifar_rounds.data.augment import TrainBatches, eval_batches, normalize
from cifar_rounds.data.dataset import Split
from cifar_rounds.training.diagnostics import NoiseScale, SmallBatchProbe, sharpness, stability_bound
from cifar_rounds.training.distributed import World, from_main_rank, gather
from cifar_rounds.training.engine import EpochResult, evaluate, train_one_epoch
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import (
    amp_dtype,
    configure_determinism,
    memory_format,
    peak_memory_mb,
    reset_peak_memory,
)


@dataclass
class Trainer:
    """Everything one epoch needs, built once."""

    net: nn.Module  # the module whose state is saved
    model: nn.Module  # what trains: `net`, or its DDP and/or compiled form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: TrainBatches  # global batches; this rank trains on its shard of each
    val: tuple[torch.Tensor, torch.Tensor]
    generator: torch.Generator  # batch order and augmentation draws
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    world: World
    noise_probe: SmallBatchProbe | None
    sharpness_set: tuple[torch.Tensor, torch.Tensor] | None  # fixed training images for the Hessian


def build_optimizer(
    model: nn.Module, train: TrainParams
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=train.learning_rate,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, train.lr_milestones, train.lr_gamma)


def wrap_for_world(net: nn.Module, train: TrainParams, device: torch.device, world: World) -> nn.Module:
    """DDP over the process group (with SyncBatchNorm if asked), then torch.compile if asked."""
    if train.sync_batchnorm and device.type != "cuda":
        raise StageError("train.sync_batchnorm: PyTorch's SyncBatchNorm runs on CUDA devices only")
    model = net
    if world.size > 1:
        if train.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if train.compile else model


def build_trainer(params: Params, split: Split, device: torch.device, world: World) -> Trainer:
    train, diag = params.train, params.diagnostics
    if train.batch_size % world.size:
        raise StageError(
            f"train.batch_size: {train.batch_size} (the global batch) must divide by the {world.size} processes"
        )
    configure_determinism(train.deterministic)
    torch.manual_seed(train.seed)  # weight initialisation
    width = params.model.width
    net = build_model(width, len(split.label_names), device, memory_format(width, device))
    to_dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    batches = TrainBatches(
        to_dev(split.train_images),
        to_dev(split.train_labels),
        train.batch_size,
        train.random_crop,
        train.horizontal_flip,
    )
    if len(batches) == 0:
        raise StageError(f"train.batch_size: {train.batch_size} exceeds the {len(split.train_labels)} training images")
    optimizer, scheduler = build_optimizer(net, train)
    return Trainer(
        net=net,
        model=wrap_for_world(net, train, device, world),  # SyncBatchNorm shares `net`'s parameters
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        val=(to_dev(split.val_images), to_dev(split.val_labels)),
        generator=torch.Generator().manual_seed(train.seed),
        device=device,
        dtype=amp_dtype(train.precision, device),
        world=world,
        noise_probe=SmallBatchProbe(net, diag.noise_interval) if diag.noise_scale else None,
        sharpness_set=sharpness_subset(split, diag.sharpness_samples, train.seed, device) if diag.sharpness else None,
    )


def sharpness_subset(split: Split, n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same seeded, un-augmented training images at every measurement."""
    pick = torch.randperm(len(split.train_labels), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    images = normalize(torch.from_numpy(split.train_images[pick]).to(device))
    return images, torch.from_numpy(split.train_labels[pick]).to(device)


def progress_bar(iterable, total: int, desc: str):
    """A tqdm bar over batches on a terminal; the bare iterable elsewhere (epoch lines are printed instead)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def epoch_record(
    epoch: int, lr: float, result: EpochResult, val: dict, seconds: float, images: int, peak_mb: float
) -> dict:
    m = result.metrics
    return {
        "epoch": epoch,
        "learning_rate": lr,
        **m,
        **{f"val_{k}": v for k, v in val.items()},
        "train_val_accuracy_gap": m["train_accuracy"] - val["accuracy"],
        "epoch_time_s": seconds,
        "images_per_s": images / seconds,
        "peak_memory_mb": peak_mb,
    }


def run_epoch(t: Trainer, epoch: int, train: TrainParams) -> tuple[dict, EpochResult, list]:
    """Train one epoch, validate, step the schedule: the epoch's record, result and noise samples."""
    batches = t.batches
    lr = t.optimizer.param_groups[0]["lr"]
    reset_peak_memory(t.device)
    start = time.perf_counter()
    stream = progress_bar(batches.epoch(t.generator, t.world.shard), len(batches), f"epoch {epoch}")
    result = train_one_epoch(t.model, t.optimizer, stream, len(batches), t.device, t.dtype, t.noise_probe)
    seconds = time.perf_counter() - start
    samples = (
        t.noise_probe.results(torch.tensor(result.step_grad_norms).square(), train.batch_size) if t.noise_probe else []
    )
    result, samples = reduce_over_ranks(result, samples, t.world)
    if result.first_bad_step is not None:
        raise StageError(
            f"loss became non-finite at epoch {epoch}, step {result.first_bad_step + 1} "
            f"(learning rate {lr:g}); the last good checkpoint is kept"
        )
    val_x, val_y = t.val
    # the plain module: no DDP collectives (or recompilation) for evaluation
    val = evaluate(t.net, eval_batches(val_x, val_y, train.eval_batch_size), val_y, t.device, t.dtype)
    t.scheduler.step()
    record = epoch_record(epoch, lr, result, val, seconds, len(batches) * train.batch_size, peak_memory_mb(t.device))
    return from_main_rank(record, t.world), result, samples


def reduce_over_ranks(result: EpochResult, samples: list, world: World) -> tuple[EpochResult, list]:
    """Train loss and accuracy over the global batch; the first non-finite step on any rank; the mean
    half-batch norm (each rank's is an independent small-batch sample).

    Gradient norms need nothing: DDP's gradients are already all-reduced.
    """
    if world.size == 1:
        return result, samples
    m = result.metrics
    first_bad = -1 if result.first_bad_step is None else result.first_bad_step
    ranks = gather([m["train_loss"], m["train_accuracy"], first_bad, *(s for s, *_ in samples)], world)
    columns = [sum(c) / world.size for c in zip(*ranks)]
    bad_steps = [int(r[2]) for r in ranks if r[2] >= 0]
    metrics = {**m, "train_loss": columns[0], "train_accuracy": columns[1]}
    reduced = EpochResult(metrics, result.step_grad_norms, min(bad_steps) if bad_steps else None)
    return reduced, [(s, *rest) for s, (_, *rest) in zip(columns[3:], samples)]


def sharpness_due(epoch: int, finished: bool, params: Params) -> bool:
    epochs = params.diagnostics.sharpness_epochs or params.train.lr_milestones
    return finished or epoch in epochs


def diagnose(t: Trainer, params: Params, samples: list, noise: NoiseScale, lr: float, due: bool) -> dict:
    """The epoch's noise scale (moving averages updated) and, when due, sharpness."""
    out = {}
    for sample in samples:
        noise.update(*sample)
    if t.noise_probe is not None and noise.updates:
        out.update(noise_scale=noise.b_simple, noise_g_sq=noise.g_sq, noise_trace_sigma=noise.trace_sigma)
    if t.sharpness_set is not None and due:
        diag, train = params.diagnostics, params.train
        out.update(
            sharpness(
                t.net,
                *t.sharpness_set,
                diag.power_iterations,
                diag.hutchinson_samples,
                train.seed,
                tolerance=diag.power_tolerance,
            )
        )
        # SGD sees the loss curvature plus weight decay: the bound on the loss Hessian's lambda_max
        out["stability_bound"] = stability_bound(lr, train.momentum, train.nesterov) - train.weight_decay
    return out
