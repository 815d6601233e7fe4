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


def pack_padded(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> int32 (N, 40, 40): zero-padded, each pixel's RGB(+0) bytes in one word.

    A crop then gathers one 4-byte word per pixel instead of three scattered bytes.
    """
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)  # (N, 3, 40, 40)
    rgba = torch.nn.functional.pad(padded.permute(0, 2, 3, 1), (0, 1)).contiguous()  # (N, 40, 40, 4)
    return rgba.view(torch.int32).squeeze(-1)


def crop_and_flip(
    packed: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """32x32 windows of the packed padded images packed[index], flipped where asked.

    One gather; the result is uint8 (B, 32, 32, 4): each pixel's RGB bytes and a zero byte.
    """
    size = packed.shape[-1] - 2 * CROP_PADDING
    ar = torch.arange(size, device=packed.device)
    rows = dy[:, None] + ar  # (B, 32)
    cols = torch.where(flip[:, None], dx[:, None] + (size - 1 - ar), dx[:, None] + ar)
    words = packed[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 32, 32) int32
    return words.view(torch.uint8).view(*words.shape, 4)


def colour_channels(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 4) pixels -> a (B, 3, H, W) channels-last view of their RGB values."""
    return pixels[..., :3].permute(0, 3, 1, 2)


def standardisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (1, 3, 1, 1) on `device`: pixel value v in 0..255 -> shift + scale * v."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (-mean / std).to(device), (1 / (255 * std)).to(device)


def normalize(images: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Images in 0..255 (uint8 or float, any layout) -> standardised fp32 in channels-last memory.

    Loops pass `affine` = standardisation(device), made once: building it copies from the host,
    which on CUDA would wait for the device at every batch.
    """
    shift, scale = affine if affine is not None else standardisation(images.device)
    out = torch.empty(images.shape, device=images.device, memory_format=torch.channels_last)
    return torch.addcmul(shift, images, scale, out=out)


class TrainBatches:
    """Shuffled, augmented training batches from uint8 images held on the device.

    `batch_size` here is per process; the last incomplete batch is dropped so
    every step has the same shape (and batch norm never sees a single image).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, crop: bool, flip: bool):
        self.packed = pack_padded(images)
        self.affine = standardisation(images.device)
        self.labels = labels
        self.batch_size = batch_size
        self.crop, self.flip = crop, flip

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def epoch(
        self, generator: torch.Generator, shard: slice = slice(None)
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = draw_epoch(len(self.labels), generator, self.crop, self.flip)
        device = self.packed.device
        order, dy, dx, flip = (t.to(device, non_blocking=True) for t in vars(draws).values())
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl][shard]
            pixels = crop_and_flip(self.packed, idx, dy[sl][shard], dx[sl][shard], flip[sl][shard])
            # all four bytes to float in one contiguous pass first: converting the three colour
            # bytes directly moves 3-element runs and makes normalisation 2.6x slower on CPU
            yield normalize(colour_channels(pixels.float()), self.affine), self.labels[idx]


def eval_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    affine = standardisation(images.device)
    for i in range(0, len(labels), batch_size):
        yield normalize(images[i : i + batch_size], affine), labels[i : i + batch_size]
