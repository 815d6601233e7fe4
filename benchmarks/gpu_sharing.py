"""Several trainings on one device at once: total images per second and each run's slowdown.

    python benchmarks/gpu_sharing.py --device cuda --counts 1,2,4,8 --width 64 --batch-size 96 --steps 40

For each count K, starts K training processes on the same device (ResNet-18, SGD, bf16 autocast
on CUDA, channels-last, random images), lets each warm up, waits until all K are warm, then
times `--steps` steps in each. Prints each count's rates, their total, and the slowdown of one
run against running alone; the last line names the largest K whose total still grew by 10% or
more over the count before it, the slots per GPU (CIFAR_ROUNDS_SLOTS_PER_GPU) this device pays
for. benchmarks/gpu_check.py runs it as its concurrency part.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

WARMUP_STEPS = 5


def child(device: str, width: int, batch: int, steps: int, ready: Path, count: int) -> None:
    import torch
    import torch.nn.functional as F

    from cifar_rounds.training.model import build_model
    from cifar_rounds.training.runtime import amp_dtype, configure_cpu, memory_format

    dev = torch.device(device)
    configure_cpu(dev)
    fmt = memory_format(width, dev)
    model = build_model(width, 10, dev, fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=dev)
    dtype = amp_dtype("auto", dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(WARMUP_STEPS):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    (ready / f"{id(model)}-{time.monotonic_ns()}").touch()
    while len(list(ready.iterdir())) < count:  # all warm: the timed steps overlap
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    print(f"{steps * batch / (time.perf_counter() - start):.1f}")


def concurrent_rates(args, count: int) -> list[float]:
    with tempfile.TemporaryDirectory() as ready:
        cmd = [sys.executable, __file__, "--child", "--ready", ready, "--count", str(count)]
        cmd += ["--device", args.device, "--width", str(args.width), "--batch-size", str(args.batch_size)]
        cmd += ["--steps", str(args.steps)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(count)]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"gpu_sharing: a training process failed (exit {[p.returncode for p in procs]})")
    return [float(out.strip().splitlines()[-1]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu")
    parser.add_argument("--counts", default="1,2,4,8", help="concurrent trainings to measure, comma-separated")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=40, help="timed steps in each process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.device, args.width, args.batch_size, args.steps, args.ready, args.count)
        return
    counts = [int(c) for c in args.counts.split(",")]
    print(f"date: {date.today()}  device {args.device}; ResNet-18 width {args.width}, batch {args.batch_size}")
    alone, best, previous = None, counts[0], None
    for count in counts:
        rates = concurrent_rates(args, count)
        total = sum(rates)
        alone = alone or total / count
        slowdown = alone / (total / count)
        print(
            f"concurrent {count}: per run {', '.join(f'{r:.0f}' for r in rates)} img/s; "
            f"total {total:.0f} img/s; per-run slowdown {slowdown:.2f}x"
        )
        if previous is not None and total >= 1.1 * previous:
            best = count
        previous = total
    print(f"slots per GPU that still pay (total +10% or more over the count before): {best}")


if __name__ == "__main__":
    main()
