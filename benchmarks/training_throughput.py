"""Training throughput: this project's device-resident pipeline against the conventional loop.

    python benchmarks/training_throughput.py [--batch-size 128] [--steps 4] [--width 64] [--precision auto]

Same model, batch size and device for both:
1. ours: uint8 images on the device, batched crop+flip+normalise, channels-last,
   `train.precision` (auto: bf16 autocast where the hardware has bf16 units);
2. conventional: a map-style dataset returning one PIL image per index (as
   torchvision.datasets.CIFAR10 does), RandomCrop(32, padding=4),
   RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with worker
   processes, fp32, contiguous memory;
3. the two data pipelines alone, without a model.
Random uint8 images stand in for CIFAR-10 (the cost does not depend on content).
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar_rounds.data.augment import CIFAR10_MEAN, CIFAR10_STD, TrainBatches
from cifar_rounds.training.model import ResNet18
from cifar_rounds.training.pace import images_per_second, make_step
from cifar_rounds.training.runtime import amp_dtype, run_conditions

GFLOP_PER_IMAGE = 3.33  # forward + backward of the CIFAR ResNet-18, per training image
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


class PILDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does per index: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images.transpose(0, 2, 3, 1), labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_loader(images, labels, batch_size, device) -> DataLoader:
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    return DataLoader(
        PILDataset(images, labels, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=min(8, os.cpu_count() or 1),
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )


def endless(make_epoch):
    while True:
        yield from make_epoch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration")
    parser.add_argument("--data-batches", type=int, default=30, help="timed batches for the data pipelines alone")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--images", type=int, default=10_000, help="size of the random stand-in training set")
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile (train.compile: true)")
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead"),
        default="default",
        help="torch.compile mode; reduce-overhead adds CUDA graphs (the train stage uses default)",
    )
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="ours: train.precision")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    bs = args.batch_size
    ours_batches = TrainBatches(
        torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), bs, True, True
    )
    generator = torch.Generator().manual_seed(0)
    ours_stream = endless(lambda: ours_batches.epoch(generator))
    conv_loader = conventional_loader(images, labels, bs, device)
    conv_stream = endless(lambda: iter(conv_loader))

    results = {}
    for name, stream, channels_last, dtype in (
        ("ours", ours_stream, True, amp_dtype(args.precision, device)),
        ("conventional", conv_stream, False, None),
    ):
        torch.manual_seed(0)
        model = ResNet18(width=args.width).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        runnable = torch.compile(model, mode=args.compile_mode) if args.compile and name == "ours" else model
        results[name] = images_per_second(make_step(runnable, optimizer, device, dtype), stream, args.steps, bs, device)
    noop = lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True))  # noqa: E731
    data_ours = images_per_second(noop, ours_stream, args.data_batches, bs, device)
    data_conv = images_per_second(noop, conv_stream, args.data_batches, bs, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"date: {date.today()}  device: {name}  ({os.cpu_count()} CPU cores, torch {torch.__version__})")
    ours_dtype = run_conditions(args.precision, args.width, device)["precision"]
    print(
        f"model: ResNet-18 width {args.width}, batch {bs}, {args.steps} timed steps each; "
        f"ours: precision {args.precision} -> {ours_dtype}, compiled: {args.compile and args.compile_mode}; "
        "conventional: fp32"
    )
    print(f"training, ours:         {results['ours']:10.1f} img/s")
    print(f"training, conventional: {results['conventional']:10.1f} img/s")
    print(f"training speed-up:      {results['ours'] / results['conventional']:10.2f}x")
    print(f"data only, ours:         {data_ours:10.0f} img/s")
    print(f"data only, conventional: {data_conv:10.0f} img/s")
    print(f"data speed-up:           {data_ours / data_conv:10.1f}x")
    if device.type == "cuda" and args.width == 64:
        achieved = results["ours"] * GFLOP_PER_IMAGE / 1000
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        share = f" = {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
        print(f"achieved: {achieved:.1f} TFLOP/s{share}")


if __name__ == "__main__":
    main()
