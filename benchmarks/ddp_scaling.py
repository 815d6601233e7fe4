"""Per-process training throughput with 1 and 2 torchrun processes (DDP), on this machine.

    python benchmarks/ddp_scaling.py [--width 16] [--images 6000] [--batch-size 128] [--procs 1 2]

Builds a throwaway pipeline project on a generated archive, runs the real train
stage under `torchrun --standalone --nproc_per_node=K` (gloo on CPU, NCCL on
GPUs) for two epochs, and reads the second epoch's images/s from the stage's
own history. train.batch_size is the global batch, so each process trains on
batch_size / K images per step.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from cifar_rounds.cli.demo import dvc, init_project, offline_params
from cifar_rounds.core.params import PARAMS_FILE, load_params
from cifar_rounds.data.synthetic import write_archive

REPO = Path(__file__).resolve().parents[1]


def throughput(project: Path, procs: int) -> float:
    history = f"reports/ddp{procs}.csv"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "cifar_rounds.stages.train",
            "--split",
            "data/split.npz",
            "--models",
            f"models{procs}",
            "--history",
            history,
            "--summary",
            f"reports/ddp{procs}.json",
        ],
        cwd=project,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(project / history) as f:
        return float(list(csv.DictReader(f))[-1]["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "p"
        archive = Path(tmp) / "a.tar.gz"
        md5 = write_archive(archive, args.images, 500, seed=0)
        overrides = {
            "model.width": args.width,
            "train.batch_size": args.batch_size,
            "train.num_epochs": 2,
            "train.lr_milestones": [1],
            "train.deterministic": False,
            "train.device": "auto",
            "tracking.log_model": False,
        }
        init_project(REPO, project, offline_params(load_params(REPO / PARAMS_FILE), archive, md5, overrides))
        dvc("repro", "split", cwd=project)
        rates = {k: throughput(project, k) for k in args.procs}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    print(f"date: {date.today()}  device: {device}  ({os.cpu_count()} CPU cores, torch {torch.__version__})")
    print(f"ResNet-18 width {args.width}, global batch {args.batch_size}, {args.images} generated images")
    for k, rate in rates.items():
        print(
            f"{k} process(es): {rate:8.1f} img/s in all, {rate / k:8.1f} img/s per process, "
            f"scaling efficiency {rate / (k * rates[min(rates)]):.0%}"
        )


if __name__ == "__main__":
    main()
