"""Cost of gradient-norm measurement, MLflow tracking and the noise-scale probe, as a share of epoch time.

    python benchmarks/tracking_overhead.py [--width 64] [--batch-size 96] [--steps 6]

Trains the same model on random data with gradient norms off and on (alternating
rounds, so drift hits both), times `GradNorms.record` alone, times one epoch's
MLflow logging (epoch metrics plus the per-step series at the default interval)
into a real sqlite store, times one sample of MLflow's system metrics (read,
aggregated and logged: a share of `tracking.system_metrics_interval_s`, whatever
the epoch's length) and the per-epoch peak-memory reading, and times the
gradient-noise-scale probe (a half-batch forward and backward every
`diagnostics.noise_interval` steps). Overheads are projected onto a full
CIFAR-10 epoch (45,000 training images) at the batch size.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date

import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from cifar_rounds.core.params import Params, load_params, with_overrides
from cifar_rounds.data.augment import TrainBatches
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.training.diagnostics import SmallBatchProbe
from cifar_rounds.training.engine import GradNorms, autocast, train_one_epoch
from cifar_rounds.training.model import ResNet18
from cifar_rounds.training.runtime import amp_dtype, peak_memory_mb, run_conditions
from cifar_rounds.training.trainer import build_optimizer

TRAIN_IMAGES = 45_000
CPU = torch.device("cpu")


def timed_epoch(model, optimizer, batches, generator, steps, dtype, grad_norms: bool) -> float:
    start = time.perf_counter()
    train_one_epoch(model, optimizer, batches.epoch(generator), steps, CPU, dtype, grad_norms=grad_norms)
    return (time.perf_counter() - start) / steps


def record_cost(model, repeats: int = 200) -> float:
    """Seconds per GradNorms.record() call, gradients already present."""
    model(torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    norms = GradNorms(model, repeats, CPU)
    start = time.perf_counter()
    for _ in range(repeats):
        norms.record()
    norms.epoch_summary()
    return (time.perf_counter() - start) / repeats


def probe_cost(model, batch_size: int, dtype, repeats: int = 3) -> float:
    """Seconds per SmallBatchProbe.measure call (half-batch forward + backward, BN buffers restored)."""
    probe = SmallBatchProbe(model, interval=1)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    probe.measure(x, y, torch.nn.functional.cross_entropy, autocast(CPU, dtype))
    start = time.perf_counter()
    for _ in range(repeats):
        probe.measure(x, y, torch.nn.functional.cross_entropy, autocast(CPU, dtype))
    return (time.perf_counter() - start) / repeats


def tracking_cost(tracker: Tracker, interval: int, steps_per_epoch: int, epochs: int = 5) -> float:
    """Seconds of MLflow logging per epoch."""
    metrics = {f"metric_{i}": float(i) for i in range(40)}  # epoch metrics plus per-block norms
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        first = (epoch - 1) * steps_per_epoch
        series = {s: 1.0 for s in range(first + 1, first + steps_per_epoch + 1) if s % interval == 0}
        tracker.log_metrics(metrics, epoch, {"grad_norm_step": series})
    return (time.perf_counter() - start) / epochs


def system_metrics_cost(tracker: Tracker, samples: int = 20) -> float:
    """Seconds per sample of MLflow's system metrics: read, aggregated and logged (each one, a worst case)."""
    monitor = SystemMetricsMonitor(tracker.run_id, tracking_uri=tracker.client.tracking_uri)
    monitor.collect_metrics()  # psutil's first CPU reading only starts its interval
    start = time.perf_counter()
    for _ in range(samples):
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    return (time.perf_counter() - start) / samples


def peak_memory_cost(repeats: int = 1000) -> float:
    """Seconds per `peak_memory_mb` reading (once per epoch)."""
    start = time.perf_counter()
    for _ in range(repeats):
        peak_memory_mb(CPU)
    return (time.perf_counter() - start) / repeats


def store_costs(params: Params, steps_per_epoch: int) -> tuple[float, float]:
    """(MLflow logging per epoch, one system-metrics sample), seconds, in a fresh sqlite store."""
    with tempfile.TemporaryDirectory() as tmp:
        params = with_overrides(params, {"tracking.tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
        tracker = Tracker.start(params, {})
        costs = (
            tracking_cost(tracker, params.tracking.grad_norm_interval, steps_per_epoch),
            system_metrics_cost(tracker),
        )
        tracker.finish()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ResNet18(width=args.width).to(memory_format=torch.channels_last)
    params = with_overrides(load_params(), {"model.width": args.width, "train.batch_size": args.batch_size})
    optimizer, _ = build_optimizer(model, params.train)
    n = args.batch_size * args.steps
    batches = TrainBatches(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 10, (n,)),
        args.batch_size,
        crop=True,
        flip=True,
    )
    generator = torch.Generator().manual_seed(0)
    dtype = amp_dtype(params.train.precision, CPU)  # what the train stage would use here
    timed_epoch(model, optimizer, batches, generator, 1, dtype, False)  # warm-up
    off, on = [], []
    for _ in range(args.rounds):
        off.append(timed_epoch(model, optimizer, batches, generator, args.steps, dtype, False))
        on.append(timed_epoch(model, optimizer, batches, generator, args.steps, dtype, True))
    step_off, step_on = statistics.median(off), statistics.median(on)
    steps_per_epoch = TRAIN_IMAGES // args.batch_size
    record = record_cost(model)
    logging, sample = store_costs(params, steps_per_epoch)
    epoch_off = step_off * steps_per_epoch
    direct = (record * steps_per_epoch + logging) / epoch_off
    sample_every = params.tracking.system_metrics_interval_s
    memory = peak_memory_cost()
    interval = params.diagnostics.noise_interval
    noise = probe_cost(model, args.batch_size, dtype) * (steps_per_epoch // interval) / epoch_off
    print(
        f"date: {date.today()}  host: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"model width {args.width}, batch {args.batch_size}, precision {params.train.precision} -> "
        f"{run_conditions(params.train.precision, args.width, CPU)['precision']}, "
        f"{steps_per_epoch} steps per CIFAR-10 epoch"
    )
    print(
        f"step time, norms off: {step_off * 1e3:.1f} ms   on: {step_on * 1e3:.1f} ms   (medians "
        f"of {args.rounds} rounds of {args.steps} steps)"
    )
    print(f"GradNorms.record alone: {record * 1e3:.3f} ms per step")
    print(f"MLflow logging per epoch (sqlite): {logging * 1e3:.1f} ms")
    print(f"overhead per epoch, from the direct costs: {direct:.3%}")
    print(f"overhead per epoch, from the step times (noisy): {(step_on - step_off) / step_off:+.3%}")
    print(
        f"system metrics: {sample * 1e3:.1f} ms per sample, one every {sample_every:g} s: "
        f"{sample / sample_every:.3%} of training time"
    )
    print(f"peak-memory reading: {memory * 1e6:.1f} us per epoch: {memory / epoch_off:.5%}")
    print(
        f"all tracking together (norms, logging, system metrics, peak memory): "
        f"{direct + sample / sample_every + memory / epoch_off:.3%} of epoch time"
    )
    print(f"noise-scale probe every {interval} steps: {noise:.2%} of epoch time")


if __name__ == "__main__":
    main()
