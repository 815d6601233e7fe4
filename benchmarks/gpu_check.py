"""GPU readiness in one run: environment, GPU tests, the real pipeline, resume, throughput, a projection.

    benchmarks/gpu.sh [--dry-run] [--out DIR] [--wheels DIR]   # calls this script
    benchmarks/gpu.sh --fetch-wheels .whl                       # beforehand, where PyPI is reachable

The parts run in order, each within a time budget that bounds its commands, so that a CUDA run ends
within ten minutes; a part that fails is recorded and the next one runs all the same:
1. environment: GPU, memory, driver, torch, CUDA and cuDNN versions, a bf16 matrix product's rate;
   installs the project's packages this Python lacks (carried wheels, else the package index);
2. `pytest -m gpu`;
3. the real pipeline: `dvc repro` in a generated git + DVC project (as tests/conftest.py makes) on a
   generated CIFAR-format archive, full width, precision auto, compiled; then metrics.json, the
   MLflow run (tags: the GPU, bf16) and the finiteness of the history's noise-scale and sharpness;
4. resume: the train stage SIGKILLed mid-epoch and restarted; it completes, every epoch is logged
   exactly once, and the resumed weights' distance from part 3's uninterrupted run is recorded;
5. throughput: benchmarks/training_throughput.py at batch 96, 128 and 512, eager, compiled and
   compiled with CUDA graphs, against the conventional loop, in TFLOP/s against the bf16 peak;
6. a full-width 250-epoch round projected from the measured epoch times (not run);
7. concurrency: 1, 2, 4 and 8 trainings at once on one GPU at batch 96 (benchmarks/gpu_sharing.py):
   total images/s and each run's slowdown, and the slots per GPU that still pay.
Results: gpu-check.txt (log and summary table) and gpu-check.json in --out, rewritten after every
part. Exit status 1 if a part failed. Without CUDA: one line, exit 0, unless --dry-run, which runs
parts 3 and 4 on the CPU at width 8 (parts 1, 5 and 6 in miniature), so that CI tests this script.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT_FILE, JSON_FILE = "gpu-check.txt", "gpu-check.json"
# NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200, H200 SXM): BFLOAT16 Tensor Core 1,979 TFLOPS
# "with sparsity"; the dense peak is half. A plain 8192^3 bf16 matrix product reached about 790 on
# this workplace's H200s (.library/device/KINDS.md); part 1 measures it again.
H200_BF16_DENSE_PEAK_TFLOPS = 1979 / 2
FULL_TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 training images less round 2's data.val_size
ROUND_EPOCHS, ROUND_BATCH = 250, 96  # round 2's train.num_epochs and train.batch_size
CARRY_LIMIT_MIB = 64  # what may travel to the GPU machine in all: the working tree and the carried wheels
ROUND_SHARPNESS_POINTS = 4  # round 2's sharpness measurements: three milestones and the last epoch
NOT_ON_GPU = {"psycopg2-binary"}  # the shared store's driver: no GPU part imports it
# On every GPU image already, and large: never carried as wheels, never installed.
PREINSTALLED = {
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "pyarrow",
    "matplotlib",
    "contourpy",
    "fonttools",
    "kiwisolver",
    "pillow",
    "setuptools",
    "pip",
    "wheel",
}
EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy", "grad_norm_mean")  # MLflow metrics, one per epoch
DIAGNOSTICS = ("noise_scale", "lambda_max", "hessian_trace")  # history columns, blank when not measured
MODES = {
    "eager": (),
    "compiled": ("--compile",),
    "compiled+cudagraphs": ("--compile", "--compile-mode", "reduce-overhead"),
}


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: full width on CUDA, tiny on the CPU."""

    train_images: int  # of the generated archive; data.val_size of them validate
    test_images: int
    params: dict  # params.yaml overrides on top of the repository's params.yaml and the demo's offline settings
    throughput: tuple[tuple[int, str], ...]  # (batch, mode), most wanted first
    throughput_args: tuple[str, ...]
    budgets: tuple[float | None, ...]  # seconds per part; None: what the time limit leaves
    sharing_args: tuple[str, ...]  # benchmarks/gpu_sharing.py's arguments
    time_limit: float  # seconds for the whole run


# Full width on a small archive: 9000 training images are about a second an epoch on an H200, so
# compilation dominates, and the compiled pipeline, two resume runs and the throughput rows fit.
GPU = Sizes(
    train_images=10_000,
    test_images=1_000,
    params={
        "data.val_size": 1000,
        "model.width": 64,
        "train.batch_size": 96,
        "train.num_epochs": 4,
        "train.lr_milestones": [2],
        "train.patience": 4,
        "train.eval_batch_size": 1000,
        "train.device": "cuda",
        "train.precision": "auto",
        "train.compile": True,
        "train.deterministic": False,
        "tracking.grad_norm_interval": 50,
        "diagnostics.noise_interval": 20,  # round 2's diagnostics
        "diagnostics.sharpness_samples": 512,
        "diagnostics.power_iterations": 20,
        "diagnostics.hutchinson_samples": 10,
    },
    throughput=(
        (96, "eager"),
        (96, "compiled"),
        (96, "compiled+cudagraphs"),
        (512, "eager"),
        (128, "eager"),
        (512, "compiled"),
        (512, "compiled+cudagraphs"),
        (128, "compiled"),
        (128, "compiled+cudagraphs"),
    ),
    throughput_args=("--steps", "50", "--data-batches", "50"),
    budgets=(45, 60, 180, 150, None, 5, 75),
    sharing_args=("--device", "cuda", "--counts", "1,2,4,8", "--width", "64", "--batch-size", "96", "--steps", "40"),
    time_limit=590,  # part 5: at least 75 s
)
# Width 8, not 4: at 4 the CPU's NCHW route-around of oneDNN's fault makes Hessian products crawl on AVX2.
DRY = Sizes(
    train_images=400,
    test_images=100,
    params={
        "data.val_size": 100,
        "model.width": 8,
        "train.batch_size": 32,
        "train.num_epochs": 3,
        "train.lr_milestones": [2],
        "train.patience": 3,
        "train.eval_batch_size": 500,
        "train.device": "cpu",
        "train.precision": "auto",
        "train.compile": False,
        "train.deterministic": True,
        "tracking.grad_norm_interval": 4,
        "diagnostics.noise_interval": 2,
        "diagnostics.sharpness_samples": 64,
        "diagnostics.power_iterations": 3,
        "diagnostics.hutchinson_samples": 2,
    },
    throughput=((96, "eager"),),
    throughput_args=("--steps", "2", "--data-batches", "2", "--width", "8", "--images", "512"),
    budgets=(60, 0, 600, 600, None, 5, 300),
    sharing_args=("--device", "cpu", "--counts", "1,2", "--width", "8", "--batch-size", "32", "--steps", "2"),
    time_limit=1800,
)


class PartFailed(Exception):
    """A part's check failed: args are the message and the results measured so far."""


@dataclass
class Run:
    """What the parts share: sizes, folders, the log, the results, the clock."""

    sizes: Sizes
    dry_run: bool
    out: Path
    work: Path  # generated archive, project, stand-in tools
    wheels: Path | None
    git: bool  # whether this machine has git (else a stand-in that fails, and DVC without SCM)
    selected: set[int]  # the parts to run
    started: float = field(default_factory=time.monotonic)
    part_deadline: float = math.inf
    lines: list[str] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def left(self) -> float:
        """Seconds left in the current part."""
        return self.part_deadline - time.monotonic()

    def results(self, name: str) -> dict:
        """An earlier part's results ({} where it got nowhere)."""
        return next((p["results"] for p in self.parts if p["name"] == name), {})


def child_env() -> dict[str, str]:
    """This environment less inherited MLflow and DVC settings: the generated project's own store is used."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def command(run: Run, cmd: list[str], cwd: Path, show: int = 12) -> str:
    """Its output (stdout and stderr) once it ends within the part's budget; else PartFailed with the tail.

    It runs in a process group of its own, so that a timeout ends its children (DVC's stages) too.
    """
    run.say(f"$ {' '.join(cmd)}    [in {cwd}; {run.left():.0f} s left]")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=max(run.left(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        run.say(tail(proc.communicate()[0], 40))
        raise PartFailed(f"{' '.join(cmd[1:4])}: still running when the part's budget ran out") from None
    if proc.returncode != 0:
        run.say(tail(output, 60))
        raise PartFailed(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {tail(output, 1)}")
    run.say((tail(output, show) + "\n" if show else "") + f"  ({time.monotonic() - start:.1f} s)")
    return output


def tool_bin(work: Path, git: bool) -> Path:
    """`python` (this interpreter, which dvc.yaml's commands call) and, without git, a `git` that says so."""
    folder = work / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    tools = {"python": f'exec "{sys.executable}" "$@"'} | (
        {} if git else {"git": "echo 'git: not installed' >&2; exit 1"}
    )
    for name, body in tools.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_pins() -> list[str]:
    """requirements.txt's pins (name==version) but those PREINSTALLED or NOT_ON_GPU."""
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [p for p in pins if p and canonical(p.split("==")[0]) not in PREINSTALLED | NOT_ON_GPU]


def missing(pins: list[str]) -> list[str]:
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    return [p for p in pins if canonical(p.split("==")[0]) not in installed]


def install_missing(run: Run) -> dict:
    """pip-install the project's packages this Python lacks.

    With --wheels (a machine without an index): every carried wheel, unchecked (--fetch-wheels made them
    a consistent set), into a folder put first on the import path, as .library/device/README.md does.
    Without: the pins from the package index, into this environment.
    """
    absent = missing(project_pins())
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if absent and run.wheels:
        site = run.work / "site"
        wheels = [str(w) for w in run.wheels.glob("*.whl")]
        command(run, pip + ["--no-index", "--no-deps", "--no-compile", "--target", str(site), *wheels], REPO, show=5)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    elif absent:
        command(run, pip + absent, REPO, show=5)
    importlib.invalidate_caches()
    if missing(absent):
        raise PartFailed(f"still missing after pip: {', '.join(missing(absent))}")
    return {"installed": absent, "from": str(run.wheels or "the package index") if absent else None}


def gpu_facts() -> dict:
    props = torch.cuda.get_device_properties(0)
    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        if shutil.which("nvidia-smi")
        else None
    )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": smi.stdout.strip() if smi and smi.returncode == 0 else "unknown (no nvidia-smi)",
        "bf16": torch.cuda.is_bf16_supported(),
        "bf16_matmul_tflops": bf16_matmul_tflops(),
    }


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """A plain bf16 n^3 matrix product's rate on random data: the practical ceiling for part 5."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12, 1)


def part_environment(run: Run) -> dict:
    facts = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git": shutil.which("git") if run.git else "missing: a failing stand-in, DVC without SCM",
        "packages_installed": install_missing(run),
    }
    facts |= {name: importlib.metadata.version(name) for name in ("mlflow", "dvc", "pydantic")}
    if not run.dry_run:
        facts |= gpu_facts()
    for key, value in facts.items():
        run.say(f"{key:>20}: {value}")
    return facts


def part_gpu_tests(run: Run) -> dict:
    # one process, without the ini's pytest-xdist options: the GPU image may lack the plugin, and GPU tests share GPUs
    out = command(
        run,
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=-ra",
            "-p",
            "no:xdist",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        REPO,
        show=15,
    )
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail(out, 1))}
    if counts.get("passed", 0) == 0:
        raise PartFailed(f"no GPU test passed: {tail(out, 1)}", counts)
    return counts


def build_project(run: Run) -> Path:
    """The generated archive and a git + DVC project with the real dvc.yaml and src/, made once."""
    # imported here, not at the top: part 1 may have only just installed what they need
    from cifar_rounds.cli.demo import ARCHIVE, init_project, offline_params
    from cifar_rounds.core.params import PARAMS_FILE, load_params
    from cifar_rounds.data.synthetic import write_archive

    project = run.work / "project"
    if not (project / "dvc.yaml").exists():
        md5 = write_archive(run.work / ARCHIVE, run.sizes.train_images, run.sizes.test_images, seed=0)
        params = offline_params(load_params(REPO / PARAMS_FILE), run.work / ARCHIVE, md5, run.sizes.params)
        if run.git:
            init_project(REPO, project, params)
            command(run, ["git", "add", "-A"], project, show=0)
            command(run, ["git", "commit", "-qm", "baseline"], project, show=0)
        else:
            init_without_git(project, params)
    return project


def init_without_git(project: Path, params) -> None:
    """demo.init_project's project where git is missing: DVC without SCM."""
    from cifar_rounds.cli.demo import PROJECT_FILES
    from cifar_rounds.core.params import PARAMS_FILE, dump_params

    project.mkdir(parents=True, exist_ok=True)
    for name in (n for n in PROJECT_FILES if (REPO / n).exists()):
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name,
                project / name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(REPO / name, project / name)
    dump_params(params, project / PARAMS_FILE)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True, env=child_env())


def read_history(path: Path) -> list[dict[str, float | None]]:
    """history.csv as numbers; a blank cell (not measured) is None."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def mlflow_run(project: Path, run_id: str):
    """The MLflow client on the project's store, and the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.get_run(run_id)


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def expected_conditions(device: torch.device) -> dict[str, str]:
    """The MLflow tags `device` and `precision` that a run on `device` with train.precision auto gets here."""
    from cifar_rounds.training.runtime import amp_dtype

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if amp_dtype("auto", device) is not None else "fp32",
    }


def diagnostics_found(history: list[dict], noise_g_sq: dict[int, float]) -> tuple[dict, list[str]]:
    """Each diagnostic column's measured epochs and values; problems: a non-finite value, no finite one at all.

    A NaN noise scale is documented (the |G|^2 average is not yet positive): it passes where MLflow's
    noise_g_sq at that epoch is not positive.
    """
    found, problems = {}, []
    for col in DIAGNOSTICS:
        measured = {int(r["epoch"]): r[col] for r in history if r.get(col) is not None}
        bad = [
            e
            for e, v in measured.items()
            if not math.isfinite(v) and not (col == "noise_scale" and math.isnan(v) and noise_g_sq.get(e, 1) <= 0)
        ]
        found[col] = {"epochs": list(measured), "values": list(measured.values())}
        problems += [f"{col} not finite at epochs {bad}"] if bad else []
        problems += [] if any(map(math.isfinite, measured.values())) else [f"{col}: no finite value ({measured})"]
    return found, problems


def verdict(run: Run, checks: dict[str, bool], problems: list[str], results: dict) -> dict:
    """Say each check; PartFailed naming the failed ones and the problems, else the results."""
    for name, ok in checks.items():
        run.say(f"  [{'ok' if ok else 'FAILED'}] {name}")
    results["checks"] = checks
    failed = problems + [name for name, ok in checks.items() if not ok]
    if failed:
        raise PartFailed("; ".join(failed), results)
    return results


def part_pipeline(run: Run) -> dict:
    project, p = build_project(run), run.sizes.params
    command(run, [sys.executable, "-m", "dvc", "repro"], project)
    epochs, expected = p["train.num_epochs"], expected_conditions(torch.device(p["train.device"]))
    metrics = json.loads((project / "metrics.json").read_text())
    history = read_history(project / "reports/history.csv")
    client, mlrun = mlflow_run(project, metrics["mlflow_run_id"])
    run_id = mlrun.info.run_id
    g_sq = {m.step: m.value for m in client.get_metric_history(run_id, "noise_g_sq")}
    diagnostics, problems = diagnostics_found(history, g_sq)
    logged = {k: metric_steps(client, run_id, k) for k in EPOCH_KEYS}
    # seconds from one epoch's log to the next: training, validation, diagnostics, checkpoint, logging
    stamps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "train_loss")}
    sharpness_epochs = sorted(set(p["train.lr_milestones"]) | {epochs})
    results = {
        "project": str(project),
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
        "tags": {k: mlrun.data.tags.get(k) for k in ("device", "precision", "torch_version", "git_commit")},
        "diagnostics": diagnostics,
        "epochs_logged": logged,
        "epoch_wall_s": [stamps[e] - stamps[e - 1] for e in sorted(stamps)[1:]],
        "history": [{k: r[k] for k in ("epoch", "epoch_time_s", "images_per_s", "val_loss")} for r in history],
        "width": p["model.width"],
        "batch_size": p["train.batch_size"],
        "train_images": run.sizes.train_images - p["data.val_size"],
        "val_images": p["data.val_size"],
    }
    run.say(f"diagnostics: {json.dumps(diagnostics)}")
    return verdict(
        run,
        {
            "run FINISHED": mlrun.info.status == "FINISHED",
            f"tags {expected}": all(results["tags"][k] == v for k, v in expected.items()),
            f"MLflow param train.compile {p['train.compile']}": mlrun.data.params.get("train.compile")
            == str(p["train.compile"]),
            f"stopped_epoch {epochs}": metrics.get("stopped_epoch") == epochs,
            "test accuracy in [0, 1], test loss finite": 0 <= metrics["test_accuracy"] <= 1
            and math.isfinite(metrics["test_loss"]),
            f"each epoch logged once: {', '.join(EPOCH_KEYS)}": all(
                s == list(range(1, epochs + 1)) for s in logged.values()
            ),
            f"sharpness measured at epochs {sharpness_epochs}": diagnostics["lambda_max"]["epochs"] == sharpness_epochs,
        },
        problems,
        results,
    )


def kill_mid_epoch(run: Run, project: Path, cmd: list[str], after: int) -> dict:
    """Start training; once `after` epochs are in its history, SIGKILL it half an epoch later."""
    log, history = run.work / "killed-run.log", project / cmd[cmd.index("--history") + 1]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (history.exists() and len(read_history(history)) >= after):
            if proc.poll() is not None or run.left() < 0:
                raise PartFailed(
                    f"the run to kill ended or ran out of time before epoch {after}:\n{tail(log.read_text(), 20)}"
                )
            time.sleep(0.05)
        epoch_s = read_history(history)[-1]["epoch_time_s"]
        time.sleep(epoch_s / 2)
        if proc.poll() is not None:
            raise PartFailed(f"the run ended before the kill:\n{tail(log.read_text(), 20)}")
        proc.send_signal(signal.SIGKILL)  # this process alone, as a crash would end it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = torch.load(project / cmd[cmd.index("--models") + 1] / "last.pt", map_location="cpu", weights_only=True)
    run.say(
        f"{tail(log.read_text(), 3)}\n  killed {epoch_s / 2:.2f} s into epoch {after + 1} (epoch "
        f"time {epoch_s:.2f} s); "
        f"the checkpoint then held epoch {state['progress']['epoch']}"
    )
    return {
        "kill_after_epochs": after,
        "kill_delay_s": epoch_s / 2,
        "checkpoint_epoch_at_kill": state["progress"]["epoch"],
    }


def weight_distance(reference: Path, resumed: Path) -> dict:
    """Max |difference| over the model's floating-point tensors (parameters, batch-norm statistics)."""
    a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in (reference, resumed))
    diffs = {
        k: (t.double() - b["model"][k].double()).abs().max().item()
        for k, t in a["model"].items()
        if t.is_floating_point()
    }
    worst = max(diffs, key=diffs.get)
    last = [s["progress"]["history"][-1] for s in (a, b)]
    return {
        "max_abs_weight_diff": diffs[worst],
        "worst_tensor": worst,
        "max_abs_weight": max(a["model"][k].abs().max().item() for k in diffs),
        "bit_exact": all(torch.equal(t, b["model"][k]) for k, t in a["model"].items()),
        "val_loss": [r["val_loss"] for r in last],
        "val_accuracy": [r["val_accuracy"] for r in last],
        "epochs": [s["progress"]["epoch"] for s in (a, b)],
    }


def part_resume(run: Run) -> dict:
    project, epochs = build_project(run), run.sizes.params["train.num_epochs"]
    command(run, [sys.executable, "-m", "dvc", "repro", "split"], project, show=1)
    cmd = [
        sys.executable,
        "-m",
        "cifar_rounds.stages.train",
        "--split",
        "data/split.npz",
        "--models",
        "models_killed",  # dvc.yaml's
        "--history",
        "reports/killed.csv",
        "--summary",
        "reports/killed.json",
    ]
    shutil.rmtree(project / "models_killed", ignore_errors=True)  # a reused --work folder: start from nothing
    for path in (project / "reports/killed.csv", project / "reports/killed.json"):
        path.unlink(missing_ok=True)
    results = kill_mid_epoch(run, project, cmd, after=epochs // 2)
    output = command(run, cmd, project, show=4)
    summary = json.loads((project / "reports/killed.json").read_text())
    client, mlrun = mlflow_run(project, summary["mlflow_run_id"])
    grad_steps = metric_steps(client, mlrun.info.run_id, "grad_norm_step")
    results |= {
        "resumed_line": next((s for s in output.splitlines() if "resum" in s.lower()), None),
        "epochs_logged": {k: metric_steps(client, mlrun.info.run_id, k) for k in EPOCH_KEYS},
        "run_status": mlrun.info.status,
        "stopped_epoch": summary["stopped_epoch"],
        "grad_norm_steps": len(grad_steps),
        "grad_norm_steps_unique": len(set(grad_steps)),
    }
    if (project / "models/last.pt").exists():  # part 3's uninterrupted run of the same params
        results["distance_to_uninterrupted"] = weight_distance(
            project / "models/last.pt", project / "models_killed/last.pt"
        )
    run.say(f"distance to the uninterrupted run: {json.dumps(results.get('distance_to_uninterrupted'))}")
    at_kill, finished = results["checkpoint_epoch_at_kill"], mlrun.info.status == "FINISHED"
    checks = {
        f"killed mid-run (checkpoint at epoch {at_kill} of {epochs})": at_kill < epochs,
        "the restart resumed from the checkpoint": results["resumed_line"] is not None,
        f"completed: stopped_epoch {epochs}, run FINISHED": summary["stopped_epoch"] == epochs and finished,
        f"each epoch logged exactly once: {', '.join(EPOCH_KEYS)}": all(
            s == list(range(1, epochs + 1)) for s in results["epochs_logged"].values()
        ),
        "grad_norm_step logged, once per step": len(grad_steps) == len(set(grad_steps)) > 0,
        "part 3's uninterrupted run to compare with": "distance_to_uninterrupted" in results,
    }
    if run.dry_run and "distance_to_uninterrupted" in results:  # CPU and train.deterministic: bit for bit (README)
        checks["bit-exact on the CPU"] = results["distance_to_uninterrupted"]["bit_exact"]
    return verdict(run, checks, [], results)


def parse_throughput(output: str) -> dict[str, float]:
    """The rates benchmarks/training_throughput.py prints."""
    found = {}
    for key, label in (
        ("ours_img_s", "training, ours:"),
        ("conventional_img_s", "training, conventional:"),
        ("data_ours_img_s", "data only, ours:"),
        ("data_conventional_img_s", "data only, conventional:"),
    ):
        match = re.search(rf"^{re.escape(label)}\s+([\d.]+) img/s", output, re.M)
        if match is None:
            raise PartFailed(f"the benchmark printed no '{label}'")
        found[key] = float(match.group(1))
    return found | {"speedup": round(found["ours_img_s"] / found["conventional_img_s"], 2)}


def tflops(images_per_s: float, run: Run) -> dict:
    """Ours in model TFLOP/s (the benchmark's forward + backward FLOP per image, width 64 only)."""
    if "--width" in run.sizes.throughput_args:
        return {}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from training_throughput import GFLOP_PER_IMAGE

    achieved, matmul = images_per_s * GFLOP_PER_IMAGE / 1000, run.results("environment").get("bf16_matmul_tflops")
    return {
        "tflops": round(achieved, 1),
        "of_bf16_peak": round(achieved / H200_BF16_DENSE_PEAK_TFLOPS, 4),
        "of_measured_matmul": round(achieved / matmul, 4) if matmul else None,
    }


def part_throughput(run: Run) -> dict:
    rows, failures = [], []
    for batch, mode in run.sizes.throughput:
        row = {"batch": batch, "mode": mode, "status": "not run: the part's budget was spent"}
        rows.append(row)
        if run.left() < 20:
            failures.append(f"batch {batch} {mode} not run")
            continue
        cmd = [
            sys.executable,
            "benchmarks/training_throughput.py",
            "--batch-size",
            str(batch),
            *run.sizes.throughput_args,
            *MODES[mode],
        ]
        try:
            row |= parse_throughput(command(run, cmd, REPO, show=8))
            row |= tflops(row["ours_img_s"], run) | {"status": "measured"}
        except PartFailed as error:
            row["status"] = f"failed: {error.args[0]}"
            failures.append(f"batch {batch} {mode}: {error.args[0]}")
    run.say(throughput_table(rows))
    results = {
        "rows": rows,
        "peak_tflops": H200_BF16_DENSE_PEAK_TFLOPS,
        "peak_source": "NVIDIA H200 datasheet, H200 SXM: BFLOAT16 Tensor Core 1,979 TFLOPS with sparsity, halved",
    }
    if failures:
        raise PartFailed("; ".join(failures), results)
    return results


def throughput_table(rows: list[dict]) -> str:
    lines = [
        f"{'batch':>5} {'mode':<20} {'ours img/s':>11} {'conv. img/s':>11} {'speed-up':>8} "
        f"{'TFLOP/s':>8} {'of peak':>8}"
    ]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"{r['batch']:>5} {r['mode']:<20} {r['status']}")
            continue
        share = f"{r['of_bf16_peak']:.1%}" if "of_bf16_peak" in r else "-"
        lines.append(
            f"{r['batch']:>5} {r['mode']:<20} {r['ours_img_s']:>11.0f} {r['conventional_img_s']:>11.0f} "
            f"{r['speedup']:>7.2f}x {r.get('tflops', '-'):>8} {share:>8}"
        )
    return "\n".join(lines)


def part_projection(run: Run) -> dict:
    """A round of 250 epochs on 45,000 images, from part 3's epochs (time between epoch logs)
    and from part 5's rates."""
    pipe = run.results("pipeline")
    if not pipe.get("history"):
        raise PartFailed("part 3 measured no epochs")
    steady = pipe["history"][1:] or pipe["history"]  # the first epoch holds compilation and warm-up
    images_per_s, batch = statistics.median(r["images_per_s"] for r in steady), pipe["batch_size"]
    train_s = (FULL_TRAIN_IMAGES // batch) * batch / images_per_s
    sharp = set(pipe["diagnostics"]["lambda_max"]["epochs"])
    rest = [(w - r["epoch_time_s"], r["epoch"] in sharp) for w, r in zip(pipe["epoch_wall_s"], pipe["history"][1:])]
    other_s = statistics.median([s for s, with_sharpness in rest if not with_sharpness] or [0.0])
    sharpness_s = max(
        statistics.median([s for s, with_sharpness in rest if with_sharpness] or [other_s]) - other_s, 0.0
    )
    first_extra_s = max(pipe["history"][0]["epoch_time_s"] - statistics.median(r["epoch_time_s"] for r in steady), 0.0)
    total_s = ROUND_EPOCHS * (train_s + other_s) + ROUND_SHARPNESS_POINTS * sharpness_s + first_extra_s
    results = {
        "basis": f"part 3: {run.sizes.params['train.device']}, width {pipe['width']}, batch {batch}, "
        f"{pipe['train_images']} training images",
        "train_images_per_s": round(images_per_s, 1),
        "train_epoch_s": round(train_s, 2),
        "other_per_epoch_s": round(other_s, 3),
        "other_measured_with_val_images": pipe["val_images"],
        "sharpness_measurement_s": round(sharpness_s, 2),
        "first_epoch_extra_s": round(first_extra_s, 1),
        "round_hours": round(total_s / 3600, 3),
        "training_only_hours_from_part_5": {
            r["mode"]: round(
                ROUND_EPOCHS * (FULL_TRAIN_IMAGES // ROUND_BATCH) * ROUND_BATCH / r["ours_img_s"] / 3600, 3
            )
            for r in run.results("throughput").get("rows", [])
            if r["batch"] == ROUND_BATCH and r["status"] == "measured"
        },
    }
    for key, value in results.items():
        run.say(f"{key:>33}: {value}")
    return results


def part_concurrency(run: Run) -> dict:
    """Trainings sharing one device: what K at once gives in total, and what each run loses."""
    out = command(run, [sys.executable, "benchmarks/gpu_sharing.py", *run.sizes.sharing_args], REPO, show=8)
    rows = [
        {"trainings": int(k), "total_img_s": float(total), "per_run_slowdown": float(slow)}
        for k, total, slow in re.findall(
            r"^concurrent (\d+): .*; total ([\d.]+) img/s; per-run slowdown ([\d.]+)x$", out, re.M
        )
    ]
    best = re.search(r"still pay .*: (\d+)$", out, re.M)
    if not rows or best is None:
        raise PartFailed("benchmarks/gpu_sharing.py printed no rates")
    return {"rows": rows, "slots_per_gpu_that_pay": int(best.group(1))}


PARTS: tuple[tuple[str, str, Callable[[Run], dict]], ...] = (
    ("environment", "environment", part_environment),
    ("gpu_tests", "pytest -m gpu", part_gpu_tests),
    ("pipeline", "dvc repro: width {width}, precision auto, compile {compile}", part_pipeline),
    ("resume", "resume: SIGKILL mid-epoch, restart", part_resume),
    ("throughput", "throughput: ours vs conventional, by batch and mode", part_throughput),
    ("projection", "projection: a 250-epoch full-width round (not run)", part_projection),
    ("concurrency", "concurrency: 1, 2, 4, 8 trainings on one device", part_concurrency),
)


def run_part(run: Run, number: int, name: str, title: str, fn: Callable[[Run], dict]) -> None:
    """Run one part within its budget and record it; an error is the part's failure, not the run's end."""
    cap = run.sizes.budgets[number - 1]
    later = sum(b or 0 for b in run.sizes.budgets[number:])
    budget = cap if cap is not None else run.sizes.time_limit - (time.monotonic() - run.started) - later
    title = title.format(width=run.sizes.params["model.width"], compile=str(run.sizes.params["train.compile"]).lower())
    why = (
        "not selected (--parts)"
        if number not in run.selected
        else "dry run: needs CUDA"
        if run.dry_run
        else "no time left"
    )
    record = {
        "number": number,
        "name": name,
        "title": title,
        "budget_s": round(budget),
        "status": "skipped",
        "error": why,
        "results": {},
    }
    run.parts.append(record)
    run.say(f"\n== part {number}/{len(PARTS)}: {title} (budget {budget:.0f} s) ==")
    start = time.monotonic()
    run.part_deadline = start + budget
    if budget > 0 and number in run.selected:
        try:
            record |= {"results": fn(run), "status": "passed", "error": None}
        except PartFailed as failure:
            record |= {"status": "failed", "error": failure.args[0], "results": (failure.args + ({},))[1]}
        except Exception as error:  # noqa: BLE001  (any error ends this part only)
            record |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    record["elapsed_s"] = round(time.monotonic() - start, 1)
    run.say(
        f"-- part {number} {record['status']} in {record['elapsed_s']} s of {budget:.0f} s"
        + (f": {record['error']}" if record["error"] else "")
    )
    write_outputs(run)


def summary_table(run: Run) -> str:
    lines = [f"{'part':<5} {'':<58} {'status':<8} {'time s':>7} {'budget s':>8}  note"]
    for p in run.parts:
        note = p["error"].splitlines()[0][:110] if p["error"] else ""
        lines.append(
            f"{p['number']:<5} {p['title']:<58} {p['status']:<8} {p['elapsed_s']:>7} {p['budget_s']:>8}  {note}"
        )
    failed = [str(p["number"]) for p in run.parts if p["status"] == "failed"]
    return "\n".join(
        lines
        + [
            f"total {time.monotonic() - run.started:.0f} s: "
            + (f"FAILED (parts {', '.join(failed)})" if failed else "no part failed")
        ]
    )


def plain(value):
    """JSON without NaN or infinities (they become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def write_outputs(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": run.dry_run,
        "time_limit_s": run.sizes.time_limit,
        "wall_s": round(time.monotonic() - run.started, 1),
        "ok": not any(p["status"] == "failed" for p in run.parts),
        "parts": run.parts,
    }
    (run.out / JSON_FILE).write_text(json.dumps(plain(doc), indent=2, default=str) + "\n")
    (run.out / TEXT_FILE).write_text("\n".join(run.lines) + "\n")


def wheel_closure(roots: list[str], python_version: str) -> dict[str, str]:
    """name -> installed version of everything `roots` need on that Python, transitively, but PREINSTALLED."""
    from packaging.requirements import Requirement

    env = {"extra": "", "python_version": python_version, "python_full_version": f"{python_version}.0"}
    seen, todo = {}, list(roots)
    while todo:
        name = canonical(todo.pop())
        if name not in seen and name not in PREINSTALLED:
            dist = importlib.metadata.distribution(name)
            seen[name] = dist.version
            todo += [r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate(env)]
    return seen


def tracked_mib() -> float:
    """The working tree's tracked files, MiB: they travel to the GPU machine with the wheels."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout.split("\0")
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file()) / 2**20


def fetch_wheels(target: Path, python_version: str) -> int:
    """Wheels, for a manylinux x86-64 CPython, of the versions installed here of what --wheels installs."""
    specs = [
        f"{n}=={v}"
        for n, v in sorted(wheel_closure([p.split("==")[0] for p in project_pins()], python_version).items())
    ]
    platforms = [
        a
        for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
        for a in ("--platform", f"{tag}_x86_64")
    ]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    while specs:
        done = subprocess.run(
            pip
            + [
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                python_version,
                *platforms,
                "-d",
                str(target),
                *specs,
            ],
            capture_output=True,
            text=True,
        )
        no_wheel = re.search(r"No matching distribution found for (\S+)", done.stderr)
        if done.returncode == 0:
            break
        if no_wheel is None or no_wheel.group(1) not in specs:
            print(done.stderr, file=sys.stderr)
            return 1
        # published as an sdist only (antlr4-python3-runtime 4.9): a pure-Python wheel built here
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(target), no_wheel.group(1)], check=True)
        specs.remove(no_wheel.group(1))
    wheels = list(target.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    room = CARRY_LIMIT_MIB - tracked_mib()
    if size > room:
        print(
            f"gpu.sh --fetch-wheels: {len(wheels)} wheels take {size:.1f} MiB but only {room:.1f} MiB can travel "
            f"to the GPU machine ({CARRY_LIMIT_MIB} MiB with the working tree); trim project_pins' closure",
            file=sys.stderr,
        )
        return 1
    print(
        f"{len(wheels)} wheels, {size:.1f} MiB in {target} for Python {python_version}; "
        f"on the GPU machine: benchmarks/gpu.sh --wheels {target.name} (carry it)"
    )
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="on the CPU at width 8: parts 3 and 4, and 1, 5, 6 in miniature"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "gpu-out"),
        help=f"folder for {TEXT_FILE} and {JSON_FILE} (default: $OUT, else ./gpu-out)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="folder for the generated archive and project (default: a temporary one, removed at the end)",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=REPO / ".whl" if (REPO / ".whl").is_dir() else None,
        help="install the missing packages from these wheels, without an index (default: .whl if there)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        help=f"seconds for the whole run; part 5 gets what the others leave "
        f"(default {GPU.time_limit:.0f}; dry run {DRY.time_limit:.0f})",
    )
    parser.add_argument(
        "--parts",
        default="1,2,3,4,5,6,7",
        help="comma-separated part numbers to run, e.g. 3,4 (4 uses 3's run for its comparison)",
    )
    parser.add_argument(
        "--fetch-wheels",
        type=Path,
        metavar="DIR",
        help="only download into DIR the wheels that --wheels needs (where PyPI is reachable), then exit",
    )
    parser.add_argument(
        "--python-version", default="3.12", help="with --fetch-wheels: the GPU machine's Python (3.12 there)"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels.resolve(), args.python_version)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu.sh: no CUDA device here (torch {torch.__version__}), nothing checked; "
            "--dry-run tries the script on the CPU"
        )
        return 0
    sizes = DRY if args.dry_run else GPU
    sizes = replace(sizes, time_limit=args.time_limit or sizes.time_limit)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    run = Run(
        sizes,
        args.dry_run,
        args.out.resolve(),
        work,
        args.wheels and args.wheels.resolve(),
        shutil.which("git") is not None,
        {int(n) for n in args.parts.split(",")},
    )
    os.environ["PATH"] = os.pathsep.join(
        [str(tool_bin(work, run.git)), os.path.dirname(sys.executable), os.environ["PATH"]]
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    if not run.git:
        os.environ["GIT_PYTHON_REFRESH"] = "quiet"  # GitPython (imported by MLflow and DVC) must not insist on git
    run.say(
        f"gpu check ({'dry run on the CPU' if args.dry_run else 'CUDA'}), {datetime.now():%Y-%m-%d %H:%M}: "
        f"limit {sizes.time_limit:.0f} s; results in {run.out}; work in {work}"
    )
    try:
        for number, (name, title, fn) in enumerate(PARTS, start=1):
            run_part(run, number, name, title, fn)
    finally:
        run.say("\n" + summary_table(run))
        write_outputs(run)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(p["status"] == "failed" for p in run.parts) else 0


if __name__ == "__main__":
    sys.exit(main())
