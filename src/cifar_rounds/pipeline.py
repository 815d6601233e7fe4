"""The device-resident data pipeline: uint8 images on the training device, batched augmentation.

Per epoch one permutation and one set of augmentation draws are made on the
CPU from a seeded generator (so the stream is the same on every device and
resumes exactly), moved once to the device, and applied batch by batch as a
single gather that crops, flips and yields channels-last images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4  # pixels of zero padding around the image before the random 32x32 crop


@dataclass(frozen=True)
class EpochDraws:
    """Everything random about one epoch of batches."""

    order: torch.Tensor  # permutation of the training set
    dy: torch.Tensor  # crop offsets in [0, 2 * padding], per image in `order` position
    dx: torch.Tensor
    flip: torch.Tensor  # bool


def draw_epoch(n: int, generator: torch.Generator, crop: bool, flip: bool) -> EpochDraws:
    span = 2 * CROP_PADDING + 1 if crop else 1
    offset = 0 if crop else CROP_PADDING
    return EpochDraws(
        order=torch.randperm(n, generator=generator),
        dy=torch.randint(span, (n,), generator=generator) + offset,
        dx=torch.randint(span, (n,), generator=generator) + offset,
        flip=(torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool),
    )


def crop_and_flip(
    padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """32x32 windows of the zero-padded uint8 images padded[index] (N, C, 40, 40), flipped where asked.

    One advanced-indexing gather; the result is (B, C, 32, 32) in channels-last memory.
    """
    size = padded.shape[-1] - 2 * CROP_PADDING
    ar = torch.arange(size, device=padded.device)
    rows = dy[:, None] + ar  # (B, 32)
    cols = torch.where(flip[:, None], dx[:, None] + (size - 1 - ar), dx[:, None] + ar)
    window = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, 32, 32, C)
    return window.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> standardised floats, keeping the memory format."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    scale, shift = 1 / (255 * std), -mean / std
    return (images.to(dtype) * scale.to(dtype) + shift.to(dtype)).contiguous(
        memory_format=torch.channels_last
    )


class TrainBatches:
    """Shuffled, augmented training batches from uint8 images held on the device.

    `batch_size` here is per process; the last incomplete batch is dropped so
    every step has the same shape (and batch norm never sees a single image).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, crop: bool, flip: bool):
        self.padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
        self.labels = labels
        self.batch_size = batch_size
        self.crop, self.flip = crop, flip

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def epoch(self, generator: torch.Generator, shard: slice = slice(None)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = draw_epoch(len(self.labels), generator, self.crop, self.flip)
        device = self.padded.device
        order, dy, dx, flip = (t.to(device, non_blocking=True) for t in vars(draws).values())
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl][shard]
            x = crop_and_flip(self.padded, idx, dy[sl][shard], dx[sl][shard], flip[sl][shard])
            yield normalize(x), self.labels[idx]


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(labels), batch_size):
        yield normalize(images[i : i + batch_size]), labels[i : i + batch_size]
