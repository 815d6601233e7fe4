"""How long a training takes here: measured training steps, and a first epoch projected to the last.

The training prints `finish_line` after the first epoch of each process (a progress bar's ETA
does not reach a log file). `scripts/pipeline.sh` runs this module before training on a CPU,
so that a run of days is announced before it starts, with the commands of a short run instead;
`benchmarks/training_throughput.py` measures with the same functions.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone

import torch
import torch.nn.functional as F

from cifar_rounds.core.errors import run_stage
from cifar_rounds.core.params import Params, load_params
from cifar_rounds.data.augment import TrainBatches
from cifar_rounds.data.cifar import CIFAR10_TRAIN_IMAGES, NUM_CLASSES
from cifar_rounds.training.engine import autocast
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import amp_dtype, configure_cpu, memory_format, select_device

SHORT_EPOCHS = 3  # of the short round suggested instead of a long CPU training
SHORT_RUNS = (
    f"cifar-rounds run round-2 --epochs {SHORT_EPOCHS}",  # a real round, a few epochs
    "scripts/offline.sh",  # the offline demo on generated data
)
EVAL_COST = 1 / 3  # an evaluated image against a trained one: the forward pass of forward + backward (2 x forward)


def duration(seconds: float) -> str:
    """`12.3 s`, `51 min`, `9.8 h`, `10.2 days`: in the unit a person reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def finish_line(epoch: int, seconds: float, epochs_left: int, now: datetime) -> str:
    """An epoch's time and, at its pace, how long the epochs left take and when they end (UTC)."""
    took = f"train: epoch {epoch} took {duration(seconds)}"
    if epochs_left <= 0:
        return took
    left = seconds * epochs_left
    ends = (now + timedelta(seconds=left)).astimezone(timezone.utc)
    s = "s" if epochs_left != 1 else ""
    return f"{took}; {epochs_left} epoch{s} to go: about {duration(left)} (ends about {ends:%Y-%m-%d %H:%M} UTC)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(
    step: Callable, batches: Iterable, steps: int, batch_size: int, device: torch.device, warmup: int = 2
) -> float:
    """Training images per second over `steps` calls of `step` on `batches`, after `warmup` untimed calls."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, dtype):
    """One optimizer step on a batch (moved to `device`): forward in `dtype` autocast, backward, update."""

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def endless(batches: TrainBatches, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches.epoch(generator)


def step_seconds(params: Params, device: torch.device, steps: int) -> float:
    """Seconds per training step of the configured model, batch and precision here, after one warm-up step.

    Random images stand in for CIFAR-10 (the cost does not depend on content); the epoch's gradient
    norms and diagnostics, a few per cent, are left out.
    """
    width, train = params.model.width, params.train
    torch.manual_seed(0)
    model = build_model(width, NUM_CLASSES, device, memory_format(width, device))
    optimizer = torch.optim.SGD(model.parameters(), lr=train.learning_rate, momentum=train.momentum)
    images = torch.randint(0, 256, (train.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_CLASSES, (train.batch_size,), device=device)
    batches = TrainBatches(images, labels, train.batch_size, train.random_crop, train.horizontal_flip)
    step = make_step(model, optimizer, device, amp_dtype(train.precision, device))
    stream = endless(batches, torch.Generator().manual_seed(0))
    return train.batch_size / images_per_second(step, stream, steps, train.batch_size, device, warmup=1)


def epoch_seconds(step_s: float, batch_size: int, val_size: int) -> float:
    """An epoch of CIFAR-10 at `step_s` per training step: its training batches, then its validation."""
    train_images = CIFAR10_TRAIN_IMAGES - val_size
    return train_images // batch_size * step_s + val_size * step_s / batch_size * EVAL_COST


def estimate_lines(params: Params, step_s: float) -> list[str]:
    """What the configured training costs on this CPU, and the commands of a short run instead."""
    train, val_size = params.train, params.data.val_size
    epoch = epoch_seconds(step_s, train.batch_size, val_size)
    epochs = f"{train.num_epochs} epoch{'s' if train.num_epochs != 1 else ''}"
    return [
        f"pipeline: no GPU here: a training step of ResNet-18 width {params.model.width}, batch {train.batch_size} "
        f"took {duration(step_s)} on this CPU",
        f"pipeline: at that pace an epoch of CIFAR-10 ({CIFAR10_TRAIN_IMAGES - val_size} training images) takes "
        f"about {duration(epoch)}, the configured {epochs} about {duration(epoch * train.num_epochs)}",
        f"pipeline: a short run instead: {SHORT_RUNS[0]} (about {duration(SHORT_EPOCHS * epoch)} at this pace), "
        f"or the offline demo: {SHORT_RUNS[1]}",
        "pipeline: training as configured now (Ctrl-C stops it; the epochs done are kept and a rerun continues)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed training steps, after one warm-up step")
    args = parser.parse_args()
    params = load_params()
    device = select_device(params.train.device)
    if device.type != "cpu":
        return  # on a GPU the training's own line after its first epoch is early enough
    configure_cpu(device)
    for line in estimate_lines(params, step_seconds(params, device, args.steps)):
        print(line, flush=True)


if __name__ == "__main__":
    run_stage(main)
