"""Cost of the sharpness measurement as a share of training time, and the noise probe's BatchNorm bias.

    python benchmarks/diagnostics_cost.py [--widths 16 64] [--samples 512] [--count-widths 16] [--bn-batches 2000]

1. Sharpness cost, per ResNet-18 width, on random images (the cost of a product does
   not depend on their content): the gradient graph (a forward pass and a create_graph
   backward, built once per measurement), a Hessian-vector product through that kept
   graph, a product with a graph of its own (the measurement before the graph was
   reused), and a training step at `--batch-size` in the precision `train.precision: auto`
   picks here. Training steps are timed in two halves around the products; times are
   medians, in CPU seconds of this process (and wall seconds), since on a shared machine
   the wall time stretches with other work's load.
2. The number of products one measurement takes: old, a fixed `--old-iterations` +
   `--old-probes`; new, power iteration to `--tolerance` (at most `--iterations`) then
   `--probes`, counted at `--count-widths` on a network trained for `--count-train-steps`
   steps on generated, learnable images.
3. The share of a `--epochs`-epoch CIFAR-10 run (45,000 training images) that
   `--measurements` measurements cost: on this CPU from the times, and for a GPU by
   arithmetic from FLOPs counted with torch.utils.flop_counter (convolutions and
   matrix products only).
4. The noise probe's bias with BatchNorm (`--bn-batches` > 0): a small conv net with
   BatchNorm on fixed data. The reference is the full-data gradient G and
   tr(Sigma) = B E|g_B - G|^2 at a batch B of `--bn-big-factor` times the data, drawn with
   replacement (what tr(Sigma)/B models); the probe's estimator at (b, 2b), averaged over
   many batches drawn with replacement (nested halves, as the probe's), is compared with
   it. The same net without BatchNorm, whose per-example gradients exist, is the control.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar_rounds.data.augment import CIFAR10_MEAN, CIFAR10_STD
from cifar_rounds.data.synthetic import generate_images
from cifar_rounds.training.diagnostics import HessianOperator, hvp, sharpness, unbiased_norm_estimates
from cifar_rounds.training.engine import autocast
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import amp_dtype, configure_cpu, memory_format

TRAIN_IMAGES = 45_000
CPU = torch.device("cpu")
BF16_OVER_TF32 = 2.0  # H100/H200 dense tensor-core peaks: 989 TFLOP/s bf16, 495 TFLOP/s TF32


def random_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def resnet(width: int) -> nn.Module:
    """The stages' model, in the layout they choose for this width."""
    torch.manual_seed(0)
    return build_model(width, 10, CPU, memory_format(width, CPU))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


class Clock:
    """Wall and CPU seconds (all of this process's threads) of a block.

    On a machine shared with other work the wall time of either side stretches with the load;
    the CPU time is close to the work done, so the shares below are taken from it.
    """

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_train_steps(model: nn.Module, batch: int, steps: int, dtype: torch.dtype | None) -> list[Clock]:
    """Each of `steps` SGD steps (momentum 0.9, weight decay 5e-4), after one warm-up step."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = random_images(batch, 1)
    clocks = []
    for _ in range(steps + 1):
        with Clock() as clock:
            with autocast(CPU, dtype):
                loss = loss_of(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clocks.append(clock)
    return clocks[1:]


def time_products(model: nn.Module, x: torch.Tensor, y: torch.Tensor, products: int) -> dict[str, float]:
    """Building the graph once, a product through it (median), a product with its own graph; wall and CPU s."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in params]
    with Clock() as build:
        hessian = HessianOperator(loss_of(model, x, y), params)
    reuse = []
    for _ in range(products):
        with Clock() as clock:
            hessian(v)
        reuse.append(clock)
    del hessian  # its graph: free it before the fresh product builds another
    with Clock() as fresh:
        hvp(loss_of(model, x, y), params, v)
    out = {}
    for unit in ("wall", "cpu"):
        out.update(
            {
                f"build_{unit}": getattr(build, unit),
                f"fresh_product_{unit}": getattr(fresh, unit),
                f"product_{unit}": statistics.median(getattr(c, unit) for c in reuse),
            }
        )
    return out


def flops_per_image(width: int, images: int = 8) -> dict[str, float]:
    """GFLOP per image: a training step (forward + backward), the gradient graph, one product through it."""
    model = resnet(width)
    x, y = random_images(images, 3)
    params = list(model.parameters())
    counts = {}
    with FlopCounterMode(display=False) as counter:
        loss_of(model, x, y).backward()
    counts["train"] = counter.get_total_flops()
    model.eval()
    with FlopCounterMode(display=False) as counter:
        hessian = HessianOperator(loss_of(model, x, y), params)
    counts["graph"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        hessian([torch.ones_like(p) for p in params])
    counts["product"] = counter.get_total_flops()
    return {f"{k}_gflop": v / images / 1e9 for k, v in counts.items()}


def learnable_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offline demo's generated classes, standardised as the pipeline does."""
    images, labels = generate_images(n, np.random.default_rng(seed))
    x = (torch.from_numpy(images).float() / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(
        CIFAR10_STD
    )[:, None, None]
    return x, torch.from_numpy(labels)


def count_products(width: int, args: argparse.Namespace) -> dict[str, float]:
    """One measurement with the proposed settings on a briefly trained network: products, seconds, eigenvalue.

    An untrained network's top eigenvalue is barely separated from the next, so power
    iteration runs to its cap there; training opens the gap, as it does on CIFAR-10.
    """
    model = resnet(width)
    x, y = learnable_images(args.samples + args.batch_size * args.count_train_steps, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(args.count_train_steps):
        batch = slice(args.samples + step * args.batch_size, args.samples + (step + 1) * args.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, x[batch], y[batch]).backward()
        optimizer.step()
    with Clock() as clock:
        out = sharpness(
            model, x[: args.samples], y[: args.samples], args.iterations, args.probes, seed=0, tolerance=args.tolerance
        )
    return {
        "counted_products": out["hessian_vector_products"],
        "counted_wall": clock.wall,
        "lambda_max": out["lambda_max"],
    }


def measure_width(width: int, args: argparse.Namespace) -> dict[str, float]:
    model = resnet(width)
    dtype = amp_dtype("auto", CPU)  # what the train stage would use on this machine
    x, y = random_images(args.samples, 0)
    half = args.train_steps // 2
    steps = time_train_steps(model, args.batch_size, half, dtype)
    timed = time_products(model, x, y, args.hvps)
    steps += time_train_steps(model, args.batch_size, args.train_steps - half, dtype)
    row = {
        "width": width,
        "step_wall": statistics.median(c.wall for c in steps),
        "step_cpu": statistics.median(c.cpu for c in steps),
        **timed,
        **flops_per_image(width),
    }
    if width in args.count_widths:
        row.update(count_products(width, args))
    return row


def shares(row: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """Sharpness over training time (CPU seconds), for `args.measurements` measurements in an `args.epochs` run."""
    epoch = (TRAIN_IMAGES // args.batch_size) * row["step_cpu"]
    old = (args.old_iterations + args.old_probes) * row["fresh_product_cpu"]
    cap = row["build_cpu"] + (args.iterations + args.probes) * row["product_cpu"]
    out = {"epoch": epoch, "old": old, "cap": cap}
    if "counted_products" in row:
        out["counted"] = row["build_cpu"] + row["counted_products"] * row["product_cpu"]
    # GPU, by arithmetic: the same FLOPs per image, whatever the device
    train_flops = args.epochs * TRAIN_IMAGES * row["train_gflop"]
    old_n, cap_n = args.old_iterations + args.old_probes, args.iterations + args.probes
    out["old_flop_share"] = (
        args.measurements * args.samples * old_n * (row["graph_gflop"] + row["product_gflop"]) / train_flops
    )
    out["cap_flop_share"] = (
        args.measurements * args.samples * (row["graph_gflop"] + cap_n * row["product_gflop"]) / train_flops
    )
    return out


def print_width(row: dict[str, float], s: dict[str, float], args: argparse.Namespace) -> None:
    share = lambda seconds: args.measurements * seconds / (args.epochs * s["epoch"])  # noqa: E731
    per_image = row["product_cpu"] / args.samples / (row["step_cpu"] / args.batch_size)
    print(
        f"width {row['width']}: training step {row['step_cpu']:.2f} CPU s, {row['step_wall']:.2f} s wall "
        f"(batch {args.batch_size}); epoch {s['epoch'] / 60:.1f} CPU min ({TRAIN_IMAGES // args.batch_size} steps)"
    )
    print(
        f"  {args.samples} samples, CPU s (wall s): graph {row['build_cpu']:.1f} ({row['build_wall']:.1f}), "
        f"product through it {row['product_cpu']:.1f} ({row['product_wall']:.1f}), product with its own graph "
        f"{row['fresh_product_cpu']:.1f} ({row['fresh_product_wall']:.1f}); a product per image "
        f"= {per_image:.1f} training images"
    )
    print(
        f"  GFLOP per image: training step {row['train_gflop']:.3f}, graph "
        f"{row['graph_gflop']:.3f}, product {row['product_gflop']:.3f}"
    )
    for name, label in (
        ("old", f"old ({args.old_iterations}+{args.old_probes} products, each its own graph)"),
        ("cap", f"new at the cap ({args.iterations}+{args.probes} products, one graph)"),
        ("counted", f"new, counted ({row.get('counted_products', 0):.0f} products at tolerance {args.tolerance:g})"),
    ):
        if name in s:
            print(
                f"  {label}: {s[name] / 60:.1f} CPU min = {s[name] / s['epoch']:.2f} epochs; "
                f"{args.measurements} of them: {share(s[name]):.2%} of training"
            )
    if "counted_products" in row:
        print(
            f"  (counted after {args.count_train_steps} training steps: {row['counted_wall'] / 60:.1f} min wall, "
            f"lambda_max {row['lambda_max']:.4g})"
        )
    print(
        f"  GPU by arithmetic (FLOPs, equal throughput per FLOP): old {s['old_flop_share']:.2%}, "
        f"new at the cap {s['cap_flop_share']:.2%}; with fp32 sharpness on TF32 at half the bf16 rate: "
        f"old {BF16_OVER_TF32 * s['old_flop_share']:.2%}, new {BF16_OVER_TF32 * s['cap_flop_share']:.2%}"
    )


def small_net(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=not batchnorm),
        norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=not batchnorm),
        norm(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the batch's mean loss, BatchNorm on the batch's own statistics (train mode)."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))])


def reference_noise(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, big: int, batches: int, generator: torch.Generator
) -> tuple[float, float, float]:
    """|G|^2 of the full data; tr(Sigma) = B E|g_B - G|^2 at a large B, and its standard error.

    Per-example gradients are not defined with BatchNorm, and adding one example to the data
    moves the batch statistics enough to flip ReLUs, so finite differences give no derivative
    either; the large-batch variance is what tr(Sigma)/B models.
    """
    full = flat_grad(model, x, y)
    dev = torch.tensor(
        [
            big * (flat_grad(model, x[idx], y[idx]) - full).square().sum().item()
            for idx in (torch.randint(0, len(y), (big,), generator=generator) for _ in range(batches))
        ],
        dtype=torch.float64,
    )
    return full.square().sum().item(), dev.mean().item(), dev.std().item() / math.sqrt(batches)


def per_example_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(Sigma) from true per-example gradients (defined without BatchNorm only)."""
    grads = torch.stack([flat_grad(model, x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    return (grads - grads.mean(0)).square().sum(1).mean().item()


def probe_estimates(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, batches: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the probe's (|G|^2, tr(Sigma)) over batches of 2b and their first halves."""
    estimates = []
    for _ in range(batches):
        idx = torch.randint(0, len(y), (2 * b,), generator=generator)
        big = flat_grad(model, x[idx], y[idx]).square().sum().item()
        small = flat_grad(model, x[idx[:b]], y[idx[:b]]).square().sum().item()
        estimates.append(unbiased_norm_estimates(small, big, b, 2 * b))
    e = torch.tensor(estimates, dtype=torch.float64)
    return e.mean(0), e.std(0) / math.sqrt(batches)


def train_small(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """SGD at batch 32, so that |G|^2 falls towards tr(Sigma)/B as it does during training."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        optimizer.zero_grad()
        loss_of(model, x[idx], y[idx]).backward()
        optimizer.step()


def batchnorm_bias(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.bn_examples, 3, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(3 * 64, 10, generator=g)).argmax(1)  # a learnable teacher
    big = args.bn_big_factor * args.bn_examples
    print(
        f"noise probe bias: {args.bn_examples} examples (3x8x8), {args.bn_batches} batches per size, reference "
        f"tr(Sigma) from {args.bn_batches // 4} batches of {big}; relative bias of the probe's "
        "estimate +- standard error"
    )
    for batchnorm in (False, True):
        model = small_net(batchnorm)
        for steps in (0, args.bn_train_steps):
            train_small(model, x, y, steps)  # cumulative: 0, then bn_train_steps
            g_sq, trace, trace_err = reference_noise(model, x, y, big, args.bn_batches // 4, g)
            exact = "" if batchnorm else f" (per-example: {per_example_trace(model, x, y):.4g})"
            print(
                f"  {'BatchNorm' if batchnorm else 'no BatchNorm (control)'}, after {steps} steps: |G|^2 = {g_sq:.4g}, "
                f"tr(Sigma) = {trace:.4g} +- {trace_err / trace:.1%}{exact}, B_simple = {trace / g_sq:.1f}"
            )
            for b in args.bn_sizes:
                mean, err = probe_estimates(model, x, y, b, args.bn_batches, g)
                print(
                    f"    b = {b:3d}, 2b = {2 * b:3d}: |G|^2 {mean[0] / g_sq - 1:+.1%} +- {err[0] / g_sq:.1%}, "
                    f"tr(Sigma) {mean[1] / trace - 1:+.1%} +- {err[1] / trace:.1%}, "
                    f"B_simple {(mean[1] / mean[0]) / (trace / g_sq) - 1:+.1%}"
                )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="*", default=[16, 64], help="ResNet-18 widths to time sharpness at")
    p.add_argument("--samples", type=int, default=512, help="images in the sharpness subset")
    p.add_argument("--batch-size", type=int, default=96, help="training batch size (the founding analysis's)")
    p.add_argument(
        "--train-steps", type=int, default=20, help="training steps timed per width, to extrapolate an epoch"
    )
    p.add_argument("--hvps", type=int, default=3, help="Hessian-vector products timed through the kept graph")
    p.add_argument("--old-iterations", type=int, default=20, help="power iterations before the tolerance (all ran)")
    p.add_argument("--old-probes", type=int, default=10, help="Hutchinson probes before")
    p.add_argument("--iterations", type=int, default=20, help="proposed cap on power iterations")
    p.add_argument("--tolerance", type=float, default=1e-3, help="proposed relative tolerance of power iteration")
    p.add_argument("--probes", type=int, default=10, help="proposed Hutchinson probes")
    p.add_argument(
        "--count-widths",
        type=int,
        nargs="*",
        default=[16],
        help="widths at which one whole measurement runs, to count its products (slow on CPU)",
    )
    p.add_argument(
        "--count-train-steps",
        type=int,
        default=60,
        help="SGD steps on generated, learnable images before the counted measurement",
    )
    p.add_argument("--epochs", type=int, default=250, help="epochs of the projected run")
    p.add_argument("--measurements", type=int, default=4, help="sharpness measurements in it (3 milestones + the end)")
    p.add_argument("--bn-examples", type=int, default=256, help="examples of the BatchNorm-bias data set")
    p.add_argument("--bn-batches", type=int, default=2000, help="sampled batches per size for the bias; 0 skips it")
    p.add_argument(
        "--bn-sizes", type=int, nargs="*", default=[8, 32], help="small batch sizes b (the probe's half batch)"
    )
    p.add_argument("--bn-big-factor", type=int, default=8, help="the reference batch, in multiples of the data set")
    p.add_argument("--bn-train-steps", type=int, default=300, help="SGD steps before the second bias measurement")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    configure_cpu(CPU)  # before any parallel work: denormals flushed, as the stages run
    load = os.getloadavg()[0]
    print(
        f"date: {date.today()}  host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {load:.1f} at the start"
    )
    print(
        f"sharpness on {args.samples} images; projected onto {args.epochs} epochs of {TRAIN_IMAGES} images at batch "
        f"{args.batch_size} with {args.measurements} measurements"
    )
    for width in args.widths:
        row = measure_width(width, args)
        print_width(row, shares(row, args), args)
    if args.bn_batches:
        batchnorm_bias(args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
