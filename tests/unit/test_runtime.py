"""The CPU's arithmetic: denormals flushed in every thread, and oneDNN's channels-last fault routed around."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.names import RUN_CONDITIONS
from cifar_rounds.core.params import with_overrides
from cifar_rounds.training.distributed import World
from cifar_rounds.training.model import ResNet18
from cifar_rounds.training.runtime import (
    amp_dtype,
    memory_format,
    onednn_fault_channels,
    onednn_faults_at,
    peak_memory_mb,
    run_conditions,
)
from cifar_rounds.training.trainer import wrap_for_world

from helpers import env, repo_params

# A fresh process, so that the intra-op thread pool starts after the stage's configuration, as in a stage.
STAGE_START = (
    "import torch; from cifar_rounds.training.runtime import configure_cpu; configure_cpu(torch.device('cpu'))\n"
)

# A width-4 ResNet-18 built as the stages build it, fed channels-last batches as the data pipeline
# makes them, trained and differentiated twice (as the Hessian probes do). Its first projection
# shortcut is a stride-2 1x1 convolution with 4 input channels. One thread: a fault is an abort.
WIDTH_4_TRAINING = """
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import memory_format
cpu = torch.device("cpu")
net = build_model(4, 10, cpu, memory_format(4, cpu))
x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
for _ in range(10):
    net(x).square().sum().backward()
loss = torch.nn.functional.cross_entropy(net(x), torch.arange(32) % 10)
grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
torch.autograd.grad(sum(g.sum() for g in grads), list(net.parameters()))
print("done")
"""


def python(code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env(**extra), capture_output=True, text=True, timeout=120)


# Width 8 on two threads, as a training on two cores runs it, on batches that do not divide among the
# threads (the noise-scale probe's half of a batch of 50, an epoch's last batch): with AVX-512, the
# channels-last kernel segfaults or double-frees here within a few steps.
WIDTH_8_ODD_BATCHES = """
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import memory_format
cpu = torch.device("cpu")
net = build_model(8, 10, cpu, memory_format(8, cpu))
for batch in (25, 13, 49) * 4:
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), torch.arange(batch) % 10)
    torch.autograd.grad(loss, list(net.parameters()))
print("done")
"""


def test_a_width_4_model_as_the_stages_build_it_trains_and_differentiates_twice():
    result = python(STAGE_START + WIDTH_4_TRAINING, OMP_NUM_THREADS="1")
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]


def test_a_width_8_model_as_the_stages_build_it_trains_on_two_threads_on_batches_they_do_not_divide():
    result = python(STAGE_START + WIDTH_8_ODD_BATCHES, OMP_NUM_THREADS="2")
    assert result.returncode == 0 and result.stdout.strip() == "done", (result.returncode, result.stderr[-2000:])


def test_the_route_around_applies_exactly_to_widths_with_faulting_channel_counts():
    cpu = torch.device("cpu")
    avx512 = torch.cpu._is_avx512_supported()
    assert onednn_fault_channels() == (range(2, 16) if avx512 else range(2, 8))  # below the vector width, from 2
    assert [w for w in range(1, 20) if onednn_faults_at(w, cpu)] == list(range(1, 16 if avx512 else 8))
    assert not onednn_faults_at(4, torch.device("cuda"))
    assert memory_format(64, cpu) == memory_format(16, cpu) == torch.channels_last  # full width: the fast layout
    assert memory_format(4, cpu) == torch.contiguous_format
    assert memory_format(8, cpu) == (torch.contiguous_format if avx512 else torch.channels_last)
    assert memory_format(4, torch.device("cuda")) == torch.channels_last


def test_denormals_are_flushed_in_every_intra_op_thread_and_recorded():
    code = (
        STAGE_START
        + """
tiny = torch.full((1 << 20,), 1e-39)  # split over the threads
from cifar_rounds.training.runtime import run_conditions
denormals = run_conditions("fp32", 64, torch.device("cpu"))["denormals"]
print(int((tiny * 1.0).count_nonzero()), torch.get_num_threads(), denormals)
"""
    )
    nonzero, threads, recorded = python(code, OMP_NUM_THREADS="2").stdout.split()
    assert (nonzero, threads, recorded) == ("0", "2", "flushed")


def test_run_conditions_name_every_condition():
    conditions = run_conditions("fp32", 64, torch.device("cpu"))
    assert tuple(conditions) == RUN_CONDITIONS and conditions["precision"] == "fp32"
    assert conditions["layout"] == "channels_last"


def test_peak_memory_on_the_cpu_is_the_process_peak_rss_and_grows_with_a_larger_allocation():
    cpu = torch.device("cpu")
    before = peak_memory_mb(cpu)
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    assert before > 0 and peak_memory_mb(cpu) >= before + 200 * (block.sum().item() > 0)


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
