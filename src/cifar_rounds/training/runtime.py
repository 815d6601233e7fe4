"""Where a run executes: device, precision, determinism and the CPU's arithmetic, and the record of them.

`params.yaml` says what to train; these functions decide how this machine runs
it, and `run_conditions` records what they decided (MLflow tags, the train
summary, reports/run_conditions.json and the round report), since `dvc params diff` cannot
show a change of machine.
"""

from __future__ import annotations

import os
import resource

import torch

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.names import RUN_CONDITIONS


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    """CUDA (this process's GPU under torchrun) when available or asked for, else CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device: 'cuda' requested but no CUDA device is available")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def configure_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def computes_bf16_natively(device: torch.device) -> bool:
    """bf16 matrix units: CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX.

    On those, bf16 autocast is about 2x faster than fp32 (benchmarks/RESULTS.md);
    elsewhere it is emulated and slower.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # torch's own CPU feature probes (its compiler uses them too); there is no public equivalent
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on this device; None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and computes_bf16_natively(device)):
        return torch.bfloat16
    return None


def onednn_fault_channels() -> range:
    """Input channels at which this CPU's oneDNN kernel (`onednn_faults_at`) corrupts memory: from 2 to one
    below its vector width in floats (8 with AVX2, 16 with AVX-512)."""
    return range(2, 16) if torch.cpu._is_avx512_supported() else range(2, 8)


def onednn_faults_at(width: int, device: torch.device) -> bool:
    """Whether oneDNN's 1x1 strided convolution (backward, weights) would corrupt memory here.

    oneDNN 3.12's channels-last kernel for a stride-2 1x1 convolution writes out of bounds when the
    input has fewer channels than one vector register holds floats (`onednn_fault_channels`):
    - AVX2 (`jit_avx2_1x1_convolution_bwd_weights_t`), 2 to 7 channels: a heap-corruption abort with
      one thread, an endless spin with several;
    - AVX-512, 2 to 15 channels: a segfault or a double free whenever the batch does not divide among
      the intra-op threads (the noise-scale probe's half batch of 25 on 2 threads, an epoch's last
      batch, a thread count that `lease.share_cores` changed).
    ResNet-18's projection shortcuts have width, 2 x width and 4 x width input channels.
    """
    if device.type != "cpu":
        return False
    faulting = onednn_fault_channels()
    return any(c in faulting for c in (width, 2 * width, 4 * width))


def memory_format(width: int, device: torch.device) -> torch.memory_format:
    """Channels-last (faster convolutions on CPU and GPU), except where oneDNN's channels-last kernel faults.

    The fault is in the channels-last path only: oneDNN's own NCHW kernels run these shapes
    correctly, 2.5x faster than PyTorch's fallback kernels would (measured at width 4).
    """
    return torch.contiguous_format if onednn_faults_at(width, device) else torch.channels_last


def configure_cpu(device: torch.device) -> None:
    """Flush denormal floats to zero on the CPU.

    Call it before the first parallel operation: threads inherit the flush mode from the thread
    that starts them, so an intra-op pool started earlier keeps slow denormal arithmetic (a CPU
    backward pass through tiny values can crawl on AVX2 machines). Flushing is deterministic, so
    a resumed run computes what the uninterrupted one did.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def denormals_flushed() -> bool:
    """Measured on a tensor large enough to be split over the intra-op threads."""
    tiny = torch.full((1 << 17,), 1e-39)
    return int((tiny * 1.0).count_nonzero()) == 0


def run_conditions(precision: str, width: int, device: torch.device) -> dict[str, str]:
    """RUN_CONDITIONS here: the device, the precision `train.precision` became, the CPU's arithmetic, the layout."""
    cpu = device.type == "cpu"
    return dict(
        zip(
            RUN_CONDITIONS,
            (
                torch.cuda.get_device_name(device) if not cpu else "cpu",
                "bf16" if amp_dtype(precision, device) else "fp32",
                ("flushed" if denormals_flushed() else "kept") if cpu else "n/a",
                "channels_last" if memory_format(width, device) == torch.channels_last else "nchw (oneDNN fault)",
            ),
        )
    )


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_mb` (CUDA only: a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory, MiB: tensors allocated on the GPU since the last reset; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
