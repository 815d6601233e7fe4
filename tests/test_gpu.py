"""CUDA paths: bf16 autocast, device-resident data, SyncBatchNorm under torchrun. Skipped without a GPU."""

import re
import sys
from pathlib import Path

import pytest
import torch

from cifar_rounds.cli import StageError
from cifar_rounds.distributed import World
from cifar_rounds.engine import train_one_epoch
from cifar_rounds.runtime import amp_dtype, select_device
from cifar_rounds.model import ResNet18
from cifar_rounds.params import with_overrides
from cifar_rounds.pipeline import TrainBatches
from cifar_rounds.loop import wrap_for_world
from conftest import make_project, read_json, repo_params, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_sync_batchnorm_is_refused_on_cpu_with_the_field_named():
    tp = with_overrides(repo_params(), {"train.sync_batchnorm": True}).train
    with pytest.raises(StageError, match="train.sync_batchnorm"):
        wrap_for_world(ResNet18(width=4), tp, torch.device("cpu"), World())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_precision_auto_is_bf16_exactly_where_the_cpu_has_bf16_units():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is (torch.bfloat16 if flags & {"avx512_bf16", "amx_tile"} else None)
    assert amp_dtype("fp32", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16


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
    result = train_one_epoch(model, optimizer, batches.epoch(torch.Generator().manual_seed(0)), len(batches),
                             device, amp_dtype("auto", device))
    assert result.first_bad_step is None and result.metrics["grad_norm_max"] > 0


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sync_batchnorm_under_torchrun_on_two_gpus(tmp_path, archive):
    project = make_project(tmp_path / "p", archive, **{
        "train.device": "cuda", "train.sync_batchnorm": True, "train.num_epochs": 2, "train.lr_milestones": [1]})
    run(["dvc", "repro", "split"], project)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cifar_rounds.train",
         "--split", "data/split.npz", "--models", "models", "--history", "reports/history.csv",
         "--summary", "reports/train_summary.json"], project)
    assert read_json(project / "reports/train_summary.json")["stopped_epoch"] == 2
