"""CUDA paths: bf16 autocast, device-resident data, SyncBatchNorm under torchrun. Skipped without a GPU."""

import sys

import pytest
import torch

from cifar_rounds.data.augment import TrainBatches
from cifar_rounds.training.engine import train_one_epoch
from cifar_rounds.training.model import ResNet18
from cifar_rounds.training.runtime import amp_dtype, select_device

from helpers import make_project, read_json, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
def test_one_bf16_epoch_on_the_gpu_with_device_resident_data():
    device = select_device("auto")
    assert device.type == "cuda"
    torch.manual_seed(0)
    model = ResNet18(width=16).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, device=device)
    batches = TrainBatches(images, torch.randint(0, 10, (1024,), device=device), 256, True, True)
    result = train_one_epoch(
        model,
        optimizer,
        batches.epoch(torch.Generator().manual_seed(0)),
        len(batches),
        device,
        amp_dtype("auto", device),
    )
    assert result.first_bad_step is None and result.metrics["grad_norm_max"] > 0


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sync_batchnorm_under_torchrun_on_two_gpus(tmp_path, archive):
    project = make_project(
        tmp_path / "p",
        archive,
        **{"train.device": "cuda", "train.sync_batchnorm": True, "train.num_epochs": 2, "train.lr_milestones": [1]},
    )
    run(["dvc", "repro", "split"], project)
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cifar_rounds.stages.train",
            "--split",
            "data/split.npz",
            "--models",
            "models",
            "--history",
            "reports/history.csv",
            "--summary",
            "reports/train_summary.json",
        ],
        project,
    )
    assert read_json(project / "reports/train_summary.json")["stopped_epoch"] == 2
