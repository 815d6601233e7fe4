"""The CPU's arithmetic: denormals flushed in every thread, and oneDNN's AVX2 fault routed around."""

import subprocess
import sys

import torch

from cifar_rounds.runtime import ONEDNN_FAULT_CHANNELS, RUN_CONDITIONS, onednn_faults_at, run_conditions
from conftest import env

# A fresh process, so that the intra-op thread pool starts after the stage's configuration, as in a stage.
STAGE_START = "import torch; from cifar_rounds.runtime import configure_cpu; configure_cpu({width}, torch.device('cpu'))\n"

# ResNet-18's first projection shortcut at width 4: a stride-2 1x1 convolution with 4 input
# channels, in channels-last layout, backward to its weights. One thread: a fault is an abort.
SHORTCUT_BACKWARD = """
conv = torch.nn.Conv2d(4, 8, 1, 2, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(16, 4, 32, 32).contiguous(memory_format=torch.channels_last)
for _ in range(30):
    conv(x).square().sum().backward()
print("done")
"""


def python(code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env(**extra), capture_output=True, text=True, timeout=120)


def test_the_faulting_shortcut_convolution_runs_after_the_stage_configuration():
    result = python(STAGE_START.format(width=4) + SHORTCUT_BACKWARD, OMP_NUM_THREADS="1")
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]


def test_the_route_around_applies_exactly_to_widths_with_faulting_channel_counts():
    cpu = torch.device("cpu")
    on_avx2 = not torch.cpu._is_avx512_supported()
    assert [w for w in range(1, 20) if onednn_faults_at(w, cpu)] == ([1, 2, 3, 4, 5, 6, 7] if on_avx2 else [])
    assert not onednn_faults_at(4, torch.device("cuda"))
    assert 8 not in ONEDNN_FAULT_CHANNELS and 4 in ONEDNN_FAULT_CHANNELS
    code = STAGE_START.format(width=64) + "print(torch.backends.mkldnn.enabled)"
    assert python(code).stdout.strip() == "True"  # full width keeps oneDNN's fast kernels


def test_denormals_are_flushed_in_every_intra_op_thread_and_recorded():
    code = STAGE_START.format(width=64) + """
tiny = torch.full((1 << 20,), 1e-39)  # split over the threads
from cifar_rounds.runtime import run_conditions
print(int((tiny * 1.0).count_nonzero()), torch.get_num_threads(), run_conditions("fp32", torch.device("cpu"))["denormals"])
"""
    nonzero, threads, recorded = python(code, OMP_NUM_THREADS="2").stdout.split()
    assert (nonzero, threads, recorded) == ("0", "2", "flushed")


def test_run_conditions_name_every_condition():
    conditions = run_conditions("fp32", torch.device("cpu"))
    assert tuple(conditions) == RUN_CONDITIONS and conditions["precision"] == "fp32"
