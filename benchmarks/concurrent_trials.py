"""Concurrent CPU trials (a sweep's `--workers`): torch's default threads against a share of the cores each.

    python benchmarks/concurrent_trials.py [--processes 2] [--width 16] [--batch-size 64] [--steps 20]

Starts `--processes` training processes at once, each timing `--steps` SGD steps of
ResNet-18 on random images, three times: with torch's default (a thread per core in every
process); with OMP_NUM_THREADS = cores / processes; and with neither, each process leasing
a CPU place as the train stage does (training/lease.py) and setting its threads to its
share at every "epoch" (`--epoch-steps` steps). Prints each process's images per second
and their sum.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def child(width: int, batch: int, steps: int, lease_dir: str | None, epoch_steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from cifar_rounds.training.lease import lease_cpu, share_cores
    from cifar_rounds.training.model import build_model
    from cifar_rounds.training.runtime import configure_cpu, memory_format

    cpu = torch.device("cpu")
    lease = lease_cpu(Path(lease_dir)) if lease_dir else None
    configure_cpu(cpu)
    share_cores(lease)
    model = build_model(width, 10, cpu, memory_format(width, cpu))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i % epoch_steps == 0:
            share_cores(lease)  # as the train stage does at each epoch boundary
        if i == 2:
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    print(f"{steps * batch / (time.perf_counter() - start):.1f}")


def together(args, env: dict[str, str], lease_dir: str | None = None) -> list[float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--width",
        str(args.width),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--epoch-steps",
        str(args.epoch_steps),
        *(["--lease-dir", lease_dir] if lease_dir else []),
    ]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epoch-steps", type=int, default=2, help="steps between two thread-share updates")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lease-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.width, args.batch_size, args.steps, args.lease_dir, args.epoch_steps)
        return
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    share = str(max(1, (os.cpu_count() or 1) // args.processes))
    print(
        f"date: {date.today()}  {os.cpu_count()} CPU cores; {args.processes} processes at once, ResNet-18 width "
        f"{args.width}, batch {args.batch_size}, {args.steps} timed steps each"
    )
    for label, env in (
        ("torch default threads", base),
        (f"OMP_NUM_THREADS={share}", {**base, "OMP_NUM_THREADS": share}),
    ):
        rates = together(args, env)
        print(f"{label:24s} per process {', '.join(f'{r:.0f}' for r in rates)} img/s; total {sum(rates):.0f} img/s")
    with tempfile.TemporaryDirectory() as folder:  # the lease alone, without the variable
        rates = together(args, base, folder)
    label = "leased share of cores"
    print(f"{label:24s} per process {', '.join(f'{r:.0f}' for r in rates)} img/s; total {sum(rates):.0f} img/s")


if __name__ == "__main__":
    main()
