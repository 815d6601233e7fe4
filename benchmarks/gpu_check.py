"""GPU readiness in one run: environment, GPU tests, the real pipeline, resume, throughput, a projection.

    benchmarks/gpu.sh [--dry-run] [--out DIR] [--wheels DIR]   # calls this script
    benchmarks/gpu.sh --fetch-wheels .whl                       # beforehand, on a machine that reaches PyPI

The parts run in order; each has a time budget that bounds its commands, so a CUDA run ends within
ten minutes, and a part that fails is recorded while the next one still runs:
1. environment: GPU, memory, driver, torch, CUDA and cuDNN versions, a bf16 matrix product's rate;
   installs the project's packages this Python lacks (carried wheels, else the package index);
2. `pytest -m gpu`;
3. the real pipeline: `dvc repro` in a generated git + DVC project on a generated CIFAR-format
   archive, full width, precision auto, compiled; checks metrics.json, the MLflow run (its tags say
   the GPU and bf16) and the noise-scale and sharpness columns of the history;
4. resume: the train stage SIGKILLed mid-epoch and restarted; every epoch logged exactly once; how far
   the resumed weights are from part 3's uninterrupted run (on a GPU they need not be equal);
5. throughput: benchmarks/training_throughput.py at batch 96, 128 and 512, eager, compiled and
   compiled with CUDA graphs, against the conventional loop, with TFLOP/s against the bf16 peak;
6. a full-width 250-epoch round projected from the measured epoch times (not run).
Results: gpu-check.txt (the log and a summary table) and gpu-check.json in --out, rewritten after
every part. Exit status 1 if any part failed. Without CUDA: one line, exit 0, unless --dry-run, which
runs parts 3 and 4 on the CPU at width 4 (and parts 1, 5, 6 in miniature), so CI tests this script.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT_FILE, JSON_FILE = "gpu-check.txt", "gpu-check.json"
# NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200, H200 SXM column): BFLOAT16 Tensor Core
# 1,979 TFLOPS "with sparsity"; the dense peak is half of it. KINDS.md measured about 790 on a plain
# 8192^3 bf16 matrix product on this workplace's H200s; part 1 measures it again.
H200_BF16_DENSE_PEAK_TFLOPS = 1979 / 2
FULL_TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 training images less round 2's data.val_size of 5000
FULL_VAL_IMAGES = 5_000
ROUND_EPOCHS = 250  # round 2's train.num_epochs
ROUND_BATCH = 96  # round 2's train.batch_size
ROUND_SHARPNESS_POINTS = 4  # round 2's three learning-rate milestones and the last epoch
# Already on every GPU image and large: never carried as wheels, never installed.
PREINSTALLED = {"torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "pyarrow", "matplotlib",
                "contourpy", "fonttools", "kiwisolver", "pillow", "setuptools", "pip", "wheel"}
EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy", "grad_norm_mean")  # MLflow metrics logged once per epoch
DIAGNOSTICS = ("noise_scale", "lambda_max", "hessian_trace")  # history columns, blank when not measured


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: full width on CUDA, tiny on the CPU."""

    train_images: int  # generated archive's training images (data.val_size of them validate)
    test_images: int
    params: dict  # params.yaml overrides on top of cifar_rounds.demo's offline settings
    throughput: tuple[tuple[int, str], ...]  # (batch, mode), most wanted first
    throughput_args: tuple[str, ...]
    budgets: tuple[float, ...]  # seconds per part; None: what is left of the time limit
    time_limit: float  # seconds for the whole run


# Full width on a small archive: 9000 training images are about a second per epoch on an H200, so
# the compiled pipeline, two resume runs and the throughput rows fit in ten minutes.
GPU = Sizes(
    train_images=10_000, test_images=1_000,
    params={
        "data.val_size": 1000, "model.width": 64, "train.batch_size": 96, "train.num_epochs": 4,
        "train.lr_milestones": [2], "train.patience": 4, "train.eval_batch_size": 1000, "train.device": "cuda",
        "train.precision": "auto", "train.compile": True, "train.deterministic": False,
        "diagnostics.noise_interval": 20, "diagnostics.sharpness_samples": 512,  # round 2's diagnostics
        "diagnostics.power_iterations": 20, "diagnostics.hutchinson_samples": 10,
    },
    throughput=((96, "eager"), (96, "compiled"), (96, "compiled+cudagraphs"), (512, "eager"), (128, "eager"),
                (512, "compiled"), (512, "compiled+cudagraphs"), (128, "compiled"), (128, "compiled+cudagraphs")),
    throughput_args=("--steps", "50", "--data-batches", "50"),
    budgets=(45, 60, 150, 120, None, 5), time_limit=570,
)
DRY = Sizes(
    train_images=400, test_images=100,
    params={
        "data.val_size": 100, "model.width": 4, "train.batch_size": 32, "train.num_epochs": 3,
        "train.lr_milestones": [2], "train.patience": 3, "train.eval_batch_size": 500, "train.device": "cpu",
        "train.precision": "auto", "train.compile": False, "train.deterministic": True,
        "diagnostics.noise_interval": 2, "diagnostics.sharpness_samples": 64,
        "diagnostics.power_iterations": 3, "diagnostics.hutchinson_samples": 2,
    },
    throughput=((96, "eager"),),
    throughput_args=("--steps", "2", "--data-batches", "2", "--width", "8", "--images", "512"),
    budgets=(60, 0, 300, 300, 120, 5), time_limit=900,
)
MODES = {"eager": (), "compiled": ("--compile",), "compiled+cudagraphs": ("--compile", "--compile-mode", "reduce-overhead")}


class PartFailed(Exception):
    """A part's check failed; the message says which and with what values."""


@dataclass
class Run:
    """What the parts share: sizes, folders, the log, the results, the clock."""

    sizes: Sizes
    dry_run: bool
    out: Path
    work: Path
    wheels: Path | None
    git: bool  # whether this machine has git (else a stand-in that fails, and a DVC project without SCM)
    started: float = field(default_factory=time.monotonic)
    part_deadline: float = math.inf
    lines: list[str] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def left(self) -> float:
        """Seconds left in the current part."""
        return self.part_deadline - time.monotonic()

    def results(self, name: str) -> dict:
        """An earlier part's results ({} if it did not get that far)."""
        return next((p["results"] for p in self.parts if p["name"] == name), {})


# ---------------------------------------------------------------- commands


def child_env() -> dict[str, str]:
    """This process's environment less inherited MLflow and DVC settings (the pipeline's own store is used)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def command(run: Run, cmd: list[str], cwd: Path, show: int = 12) -> str:
    """Run to the end within the part's budget; its output (stdout and stderr), or PartFailed with its tail.

    The command gets its own process group, so that on a timeout its children (DVC's stage) go too.
    """
    run.say(f"$ {' '.join(cmd)}    [in {cwd}, {run.left():.0f} s left]")
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(run.left(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        run.say(tail(output, 40))
        raise PartFailed(f"{cmd[2] if len(cmd) > 2 else cmd[0]}: still running when the part's budget ran out") from None
    if proc.returncode != 0:
        run.say(tail(output, 60))
        raise PartFailed(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {tail(output, 1)}")
    if show:
        run.say(tail(output, show))
    return output


def tool_bin(work: Path, git: bool) -> Path:
    """`python` (this interpreter, which DVC's stage commands call) and, where git is missing, a `git` that says so."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shims = {"python": f'exec "{sys.executable}" "$@"'}
    if not git:
        shims["git"] = 'echo "git: not installed on this machine" >&2; exit 1'
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


# ---------------------------------------------------------------- part 1: environment


def project_requirements() -> list[str]:
    """requirements.txt's pins (name==version) of the packages a GPU image does not already have."""
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [p for p in pins if p and canonical(p.split("==")[0]) not in PREINSTALLED]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(pins: list[str]) -> list[str]:
    absent = []
    for pin in pins:
        try:
            importlib.metadata.version(pin.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            absent.append(pin)
    return absent


def install_missing(run: Run) -> dict:
    """pip-install the project's packages this Python lacks: from --wheels (no index) if given, else the index.

    pip keeps what is installed where it satisfies the requirements. Should that resolution fail, every
    carried wheel goes, without dependency checks, into a folder put first on the import path.
    """
    absent = missing(project_requirements())
    if not absent:
        return {"installed": [], "from": None}
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    source = ["--no-index", "--find-links", str(run.wheels)] if run.wheels else []
    try:
        command(run, pip + source + absent, REPO, show=5)
        how = str(run.wheels or "package index")
    except PartFailed:
        if not run.wheels:
            raise
        site = run.work / "site"
        command(run, pip + ["--no-index", "--no-deps", "--target", str(site)] + [str(w) for w in run.wheels.glob("*.whl")], REPO)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        how = f"{run.wheels} (no dependency checks, into {site})"
    importlib.invalidate_caches()
    still = missing(absent)
    if still:
        raise PartFailed(f"still missing after pip: {', '.join(still)}")
    return {"installed": absent, "from": how}


def gpu_facts() -> dict:
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return {
        "gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1), "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 else "unknown (no nvidia-smi)",
        "bf16": torch.cuda.is_bf16_supported(), "bf16_matmul_tflops": bf16_matmul_tflops(),
    }


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The rate of a plain bf16 n^3 matrix product on random data: the ceiling part 5 is read against."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 * repeats / seconds / 1e12, 1)


def part_environment(run: Run) -> dict:
    facts = {
        "python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
        "cpu_cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git": shutil.which("git") if run.git else "missing: a stand-in that fails is used, the DVC project has no git",
    }
    facts["packages_installed"] = install_missing(run)
    facts.update({name: importlib.metadata.version(name) for name in ("mlflow", "dvc", "pydantic")})
    if run.device == "cuda":
        facts.update(gpu_facts())
    for key, value in facts.items():
        run.say(f"{key:>20}: {value}")
    return facts


# ---------------------------------------------------------------- part 2: GPU tests


def part_gpu_tests(run: Run) -> dict:
    out = command(run, [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], REPO, show=15)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail(out, 1))}
    if counts.get("passed", 0) == 0:
        raise PartFailed(f"no GPU test passed: {tail(out, 1)}")
    return counts


# ---------------------------------------------------------------- part 3: the pipeline


def build_project(run: Run) -> Path:
    """The generated archive and a git + DVC project with the real dvc.yaml and src/ (as tests/conftest.py makes)."""
    # imported here: part 1 may have just installed what these need (pydantic, dvc)
    from cifar_rounds.demo import ARCHIVE, init_project, offline_params
    from cifar_rounds.params import PARAMS_FILE, load_params
    from cifar_rounds.synthetic import write_archive

    project = run.work / "project"
    if (project / "dvc.yaml").exists():
        return project
    archive = run.work / ARCHIVE
    md5 = write_archive(archive, run.sizes.train_images, run.sizes.test_images, seed=0)
    params = offline_params(load_params(REPO / PARAMS_FILE), archive, md5, run.sizes.params)  # round 2, resized
    if not run.git:
        init_without_git(project, params)
        return project
    init_project(REPO, project, params)
    for args in (["add", "-A"], ["commit", "-qm", "baseline"]):
        command(run, ["git", *args], project, show=0)
    return project


def init_without_git(project: Path, params) -> None:
    """demo.init_project's project on a machine without git: DVC without an SCM."""
    from cifar_rounds.demo import PROJECT_FILES
    from cifar_rounds.params import PARAMS_FILE, dump_params

    project.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, project / name)
    dump_params(params, project / PARAMS_FILE)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True, env=child_env())


def read_history(path: Path) -> list[dict[str, float | None]]:
    """history.csv as numbers; a blank cell (not measured) is None."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def steps_logged(client, run_id: str, keys: tuple[str, ...]) -> dict[str, list[int]]:
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def expected_conditions() -> dict[str, str]:
    """The MLflow tags `device` and `precision` this machine must give the run (precision auto)."""
    from cifar_rounds.runtime import amp_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return {"device": name, "precision": "bf16" if amp_dtype("auto", device) is not None else "fp32"}


def diagnostics_found(history: list[dict], noise_g_sq: dict[int, float]) -> tuple[dict, list[str]]:
    """Per diagnostic column: epochs measured and values; problems: non-finite values, columns never finite.

    A NaN noise scale is documented (the |G|^2 average is not yet positive) and passes where MLflow's
    noise_g_sq at that epoch says so.
    """
    found, problems = {}, []
    for col in DIAGNOSTICS:
        measured = {int(r["epoch"]): r[col] for r in history if r.get(col) is not None}
        bad = [e for e, v in measured.items() if not math.isfinite(v)
               and not (col == "noise_scale" and math.isnan(v) and noise_g_sq.get(e, 1.0) <= 0)]
        found[col] = {"epochs": sorted(measured), "values": [measured[e] for e in sorted(measured)]}
        if bad:
            problems.append(f"{col} not finite at epochs {bad}")
        if not any(math.isfinite(v) for v in measured.values()):
            problems.append(f"{col} never measured as a finite number (epochs {sorted(measured)})")
    return found, problems


def epoch_walls(client, run_id: str) -> list[float]:
    """Seconds between consecutive epochs' logs: training, validation, diagnostics, checkpoint and logging."""
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "train_loss")}
    return [(stamps[e] - stamps[e - 1]) / 1000 for e in sorted(stamps) if e - 1 in stamps]


def part_pipeline(run: Run) -> dict:
    project = build_project(run)
    command(run, [sys.executable, "-m", "dvc", "repro"], project)
    epochs, p = run.sizes.params["train.num_epochs"], run.sizes.params
    metrics = json.loads((project / "metrics.json").read_text())
    history = read_history(project / "reports/history.csv")
    client = mlflow_client(project)
    mlrun = client.get_run(metrics["mlflow_run_id"])
    tags = {k: mlrun.data.tags.get(k) for k in ("device", "precision", "torch_version", "git_commit")}
    g_sq = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "noise_g_sq")}
    diagnostics, problems = diagnostics_found(history, g_sq)
    logged = steps_logged(client, mlrun.info.run_id, EPOCH_KEYS)
    sharpness_epochs = sorted(set(p["train.lr_milestones"]) | {epochs})
    checks = {
        "run FINISHED": mlrun.info.status == "FINISHED",
        f"tags {expected_conditions()}": all(tags[k] == v for k, v in expected_conditions().items()),
        f"stopped_epoch {epochs}": metrics.get("stopped_epoch") == epochs,
        "test accuracy in [0, 1], test loss finite": 0 <= metrics["test_accuracy"] <= 1 and math.isfinite(metrics["test_loss"]),
        f"each epoch logged once: {list(EPOCH_KEYS)}": all(s == list(range(1, epochs + 1)) for s in logged.values()),
        f"sharpness measured at epochs {sharpness_epochs}": diagnostics["lambda_max"]["epochs"] == sharpness_epochs,
        "compiled (train.compile)": mlrun.data.params.get("train.compile") == str(p["train.compile"]),
    }
    results = {
        "project": str(project), "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
        "tags": tags, "diagnostics": diagnostics, "epochs_logged": logged, "checks": checks,
        "history": [{k: r[k] for k in ("epoch", "epoch_time_s", "images_per_s", "val_loss", "val_accuracy")} for r in history],
        "epoch_wall_s": epoch_walls(client, mlrun.info.run_id), "width": p["model.width"], "batch_size": p["train.batch_size"],
        "train_images": run.sizes.train_images - p["data.val_size"], "val_images": p["data.val_size"],
    }
    say_checks(run, checks)
    run.say(f"diagnostics: {json.dumps(diagnostics, default=str)}")
    problems += [name for name, ok in checks.items() if not ok]
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results


def say_checks(run: Run, checks: dict[str, bool]) -> None:
    for name, ok in checks.items():
        run.say(f"  [{'ok' if ok else 'FAILED'}] {name}")


# ---------------------------------------------------------------- part 4: resume


def train_cmd(models: str, history: str, summary: str) -> list[str]:
    """The train stage's command from dvc.yaml, on other output paths."""
    return [sys.executable, "-m", "cifar_rounds.train", "--split", "data/split.npz", "--models", models,
            "--history", history, "--summary", summary]


def kill_mid_epoch(run: Run, cmd: list[str], project: Path, after: int) -> dict:
    """Start training, wait until `after` epochs are in the history, SIGKILL it half an epoch later."""
    log = run.work / "killed-run.log"
    history = project / cmd[cmd.index("--history") + 1]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (history.exists() and len(read_history(history)) >= after):
            if proc.poll() is not None or run.left() < 0:
                raise PartFailed(f"the run to be killed {'ended' if proc.poll() is not None else 'ran out of time'} "
                                 f"before epoch {after} was done:\n{tail(log.read_text(), 20)}")
            time.sleep(0.05)
        epoch_s = read_history(history)[-1]["epoch_time_s"]
        time.sleep(epoch_s / 2)
        if proc.poll() is not None:
            raise PartFailed(f"the run ended before the kill:\n{tail(log.read_text(), 20)}")
        proc.send_signal(signal.SIGKILL)  # this one process only, as a crash would
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    models = project / cmd[cmd.index("--models") + 1]
    state = torch.load(models / "last.pt", map_location="cpu", weights_only=True)
    run.say(f"killed {epoch_s / 2:.2f} s into epoch {after + 1} (epoch time {epoch_s:.2f} s); "
            f"checkpoint at the kill: epoch {state['progress']['epoch']}")
    return {"kill_after_epochs": after, "kill_delay_s": epoch_s / 2, "checkpoint_epoch_at_kill": state["progress"]["epoch"],
            "history_rows_at_kill": len(read_history(history))}


def weight_distance(reference: Path, resumed: Path) -> dict:
    """Max |difference| over the model's floating-point tensors (parameters and batch-norm buffers)."""
    a = torch.load(reference, map_location="cpu", weights_only=True)
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    diffs = {k: (a["model"][k].double() - b["model"][k].double()).abs().max().item()
             for k in a["model"] if a["model"][k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    scale = max(a["model"][k].abs().max().item() for k in diffs)
    val = lambda s: s["progress"]["history"][-1]  # noqa: E731
    return {
        "max_abs_weight_diff": diffs[worst], "worst_tensor": worst, "max_abs_weight": scale,
        "bit_exact": all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]),
        "val_loss": [val(a)["val_loss"], val(b)["val_loss"]], "val_accuracy": [val(a)["val_accuracy"], val(b)["val_accuracy"]],
        "reference_epoch": a["progress"]["epoch"], "resumed_epoch": b["progress"]["epoch"],
    }


def part_resume(run: Run) -> dict:
    project = build_project(run)
    command(run, [sys.executable, "-m", "dvc", "repro", "split"], project, show=2)
    epochs = run.sizes.params["train.num_epochs"]
    cmd = train_cmd("models_killed", "reports/killed.csv", "reports/killed.json")
    results = kill_mid_epoch(run, cmd, project, after=epochs // 2)
    output = command(run, cmd, project, show=4)
    resumed_line = next((line for line in output.splitlines() if "resum" in line.lower()), None)
    summary = json.loads((project / "reports/killed.json").read_text())
    client = mlflow_client(project)
    mlrun = client.get_run(summary["mlflow_run_id"])
    logged = steps_logged(client, mlrun.info.run_id, EPOCH_KEYS)
    grad_steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "grad_norm_step")]
    reference = project / "models/last.pt"
    results.update(resumed_line=resumed_line, epochs_logged=logged, run_status=mlrun.info.status,
                   grad_norm_steps_logged=len(grad_steps), grad_norm_steps_unique=len(set(grad_steps)),
                   stopped_epoch=summary["stopped_epoch"])
    if reference.exists():
        results["distance_to_uninterrupted"] = weight_distance(reference, project / "models_killed/last.pt")
    checks = {
        f"killed mid-run (checkpoint epoch {results['checkpoint_epoch_at_kill']} < {epochs})": results["checkpoint_epoch_at_kill"] < epochs,
        "restart resumed from the checkpoint": resumed_line is not None,
        f"completed: stopped_epoch {epochs}, run FINISHED": summary["stopped_epoch"] == epochs and mlrun.info.status == "FINISHED",
        f"each epoch logged exactly once: {list(EPOCH_KEYS)}": all(s == list(range(1, epochs + 1)) for s in logged.values()),
        "grad_norm_step logged once per step": len(grad_steps) == len(set(grad_steps)) > 0,
        "uninterrupted reference (part 3) to compare with": "distance_to_uninterrupted" in results,
    }
    if run.dry_run and "distance_to_uninterrupted" in results:  # CPU + train.deterministic: bit for bit (README)
        checks["bit-exact on the CPU"] = results["distance_to_uninterrupted"]["bit_exact"]
    results["checks"] = checks
    say_checks(run, checks)
    run.say(f"distance to the uninterrupted run: {json.dumps(results.get('distance_to_uninterrupted'))}")
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise PartFailed("; ".join(failed), results)
    return results


# ---------------------------------------------------------------- part 5: throughput


def parse_throughput(output: str) -> dict[str, float]:
    """The figures benchmarks/training_throughput.py prints."""
    found = {}
    for key, label in (("ours_img_s", "training, ours:"), ("conventional_img_s", "training, conventional:"),
                       ("data_ours_img_s", "data only, ours:"), ("data_conventional_img_s", "data only, conventional:")):
        match = re.search(rf"^{re.escape(label)}\s+([\d.]+) img/s", output, re.M)
        if match is None:
            raise PartFailed(f"benchmark output lacks '{label}'")
        found[key] = float(match.group(1))
    found["speedup"] = round(found["ours_img_s"] / found["conventional_img_s"], 2)
    return found


def tflops(images_per_s: float, run: Run) -> dict:
    """Model FLOP/s of ours: forward + backward FLOP per image (the benchmark's figure, width 64 only)."""
    if "--width" in run.sizes.throughput_args:
        return {}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from training_throughput import GFLOP_PER_IMAGE

    achieved = images_per_s * GFLOP_PER_IMAGE / 1000
    matmul = run.results("environment").get("bf16_matmul_tflops")
    return {"tflops": round(achieved, 1), "of_bf16_peak": round(achieved / H200_BF16_DENSE_PEAK_TFLOPS, 4),
            "of_measured_matmul": round(achieved / matmul, 4) if matmul else None}


def part_throughput(run: Run) -> dict:
    rows, failures = [], []
    for batch, mode in run.sizes.throughput:
        row = {"batch": batch, "mode": mode}
        rows.append(row)
        if run.left() < 20:
            row["status"] = "not run: the part's budget was spent"
            failures.append(f"batch {batch} {mode} not run")
            continue
        cmd = [sys.executable, "benchmarks/training_throughput.py", "--batch-size", str(batch),
               *run.sizes.throughput_args, *MODES[mode]]
        try:
            row.update(parse_throughput(command(run, cmd, REPO, show=10)))
            row.update(tflops(row["ours_img_s"], run), status="measured")
        except PartFailed as error:
            row["status"] = f"failed: {error}"
            failures.append(f"batch {batch} {mode}: {error}")
    run.say(throughput_table(rows))
    results = {"rows": rows, "peak_tflops": H200_BF16_DENSE_PEAK_TFLOPS,
               "peak_source": "NVIDIA H200 datasheet, H200 SXM, BFLOAT16 Tensor Core 1,979 TFLOPS with sparsity, halved"}
    if failures:
        raise PartFailed("; ".join(failures), results)
    return results


def throughput_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'mode':<20} {'ours img/s':>11} {'conv. img/s':>11} {'speed-up':>8} {'TFLOP/s':>8} {'of peak':>8}"]
    for r in rows:
        if r.get("status") != "measured":
            lines.append(f"{r['batch']:>5} {r['mode']:<20} {r.get('status', '')}")
            continue
        share = f"{r['of_bf16_peak']:.1%}" if "of_bf16_peak" in r else "-"
        lines.append(f"{r['batch']:>5} {r['mode']:<20} {r['ours_img_s']:>11.0f} {r['conventional_img_s']:>11.0f} "
                     f"{r['speedup']:>7.2f}x {r.get('tflops', '-'):>8} {share:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- part 6: projection


def part_projection(run: Run) -> dict:
    """A full round (45,000 images, 250 epochs, round 2's diagnostics) from part 3's epochs; and from part 5's rates."""
    pipe = run.results("pipeline")
    if not pipe.get("history"):
        raise PartFailed("part 3 measured no epochs")
    steady = pipe["history"][1:] or pipe["history"]  # the first epoch holds compilation and warm-up
    images_per_s = statistics.median(r["images_per_s"] for r in steady)
    batch = pipe["batch_size"]
    train_s = (FULL_TRAIN_IMAGES // batch) * batch / images_per_s
    sharp = set(pipe["diagnostics"]["lambda_max"]["epochs"])
    plain = [w - r["epoch_time_s"] for w, r in zip(pipe["epoch_wall_s"], pipe["history"][1:]) if r["epoch"] not in sharp]
    with_sharpness = [w - r["epoch_time_s"] for w, r in zip(pipe["epoch_wall_s"], pipe["history"][1:]) if r["epoch"] in sharp]
    other_s = statistics.median(plain) if plain else 0.0
    sharpness_s = max(statistics.median(with_sharpness) - other_s, 0.0) if with_sharpness else 0.0
    first_extra_s = max(pipe["history"][0]["epoch_time_s"] - statistics.median(r["epoch_time_s"] for r in steady), 0.0)
    total = ROUND_EPOCHS * (train_s + other_s) + ROUND_SHARPNESS_POINTS * sharpness_s + first_extra_s
    results = {
        "basis": f"part 3 on {run.device}, width {pipe['width']}, batch {batch}, {pipe['train_images']} training images",
        "train_images_per_s": round(images_per_s, 1), "train_epoch_s": round(train_s, 2),
        "other_per_epoch_s": round(other_s, 3), "other_measured_on_val_images": pipe["val_images"],
        "sharpness_measurement_s": round(sharpness_s, 2), "first_epoch_extra_s": round(first_extra_s, 1),
        "round_hours": round(total / 3600, 3), "from_throughput_hours": throughput_projection(run),
    }
    for key, value in results.items():
        run.say(f"{key:>30}: {value}")
    return results


def throughput_projection(run: Run) -> dict[str, float]:
    """Training time alone of 250 epochs at each batch-96 rate part 5 measured."""
    rows = run.results("throughput").get("rows", [])
    return {r["mode"]: round(ROUND_EPOCHS * (FULL_TRAIN_IMAGES // ROUND_BATCH) * ROUND_BATCH / r["ours_img_s"] / 3600, 3)
            for r in rows if r["batch"] == ROUND_BATCH and r.get("status") == "measured"}


# ---------------------------------------------------------------- the run


PARTS: tuple[tuple[str, str, Callable[[Run], dict]], ...] = (
    ("environment", "environment", part_environment),
    ("gpu_tests", "pytest -m gpu", part_gpu_tests),
    ("pipeline", "dvc repro, full width, bf16, compiled", part_pipeline),
    ("resume", "SIGKILL mid-epoch, restart", part_resume),
    ("throughput", "throughput: batch 96/128/512, eager/compiled/CUDA graphs", part_throughput),
    ("projection", "a 250-epoch full-width round, projected", part_projection),
)


def run_part(run: Run, number: int, name: str, title: str, fn: Callable[[Run], dict]) -> None:
    cap = run.sizes.budgets[number - 1]
    later = sum(b or 0 for b in run.sizes.budgets[number:])
    budget = run.sizes.time_limit - (time.monotonic() - run.started) - later if cap is None else cap
    record = {"number": number, "name": name, "title": title, "budget_s": round(budget), "results": {}, "error": None}
    run.parts.append(record)
    run.say(f"\n== part {number}/{len(PARTS)}: {title} (budget {budget:.0f} s) ==")
    start = time.monotonic()
    run.part_deadline = start + budget
    if budget <= 0:
        record["status"] = "skipped"
        record["error"] = "dry run: needs CUDA" if run.dry_run else "no time left"
    else:
        try:
            record["results"], record["status"] = fn(run), "passed"
        except PartFailed as failure:
            record["status"], record["error"] = "failed", failure.args[0]
            record["results"] = failure.args[1] if len(failure.args) > 1 else {}
        except Exception as error:  # any other error of a part is its failure, not the run's end
            record["status"], record["error"] = "failed", f"{type(error).__name__}: {error}"
    record["elapsed_s"] = round(time.monotonic() - start, 1)
    run.say(f"-- part {number} {record['status']} in {record['elapsed_s']} s of {budget:.0f} s"
            + (f": {record['error']}" if record["error"] else ""))
    write_outputs(run)


def summary_table(run: Run) -> str:
    lines = [f"{'part':<5} {'':<58} {'status':<8} {'time s':>7} {'budget s':>8}  note"]
    for p in run.parts:
        note = (p["error"] or "").splitlines()[0][:100] if p["error"] else ""
        lines.append(f"{p['number']:<5} {p['title']:<58} {p['status']:<8} {p.get('elapsed_s', 0):>7} {p['budget_s']:>8}  {note}")
    lines.append(f"total {time.monotonic() - run.started:.0f} s; "
                 + ("all parts passed" if not any(p["status"] == "failed" for p in run.parts) else "FAILED"))
    return "\n".join(lines)


def plain(value):
    """JSON without NaN or infinity (they become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def write_outputs(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": run.dry_run, "device": run.device,
        "time_limit_s": run.sizes.time_limit, "wall_s": round(time.monotonic() - run.started, 1),
        "ok": not any(p["status"] == "failed" for p in run.parts), "parts": run.parts,
    }
    (run.out / JSON_FILE).write_text(json.dumps(plain(doc), indent=2, default=str) + "\n")
    (run.out / TEXT_FILE).write_text("\n".join(run.lines) + "\n")


# ---------------------------------------------------------------- wheels for a machine without an index


def closure(roots: list[str], python_version: str) -> dict[str, str]:
    """name -> version of the installed distributions `roots` need, transitively, on that Python."""
    from packaging.requirements import Requirement

    env = {"extra": "", "python_version": python_version, "python_full_version": f"{python_version}.0"}
    seen, todo = {}, list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in seen or name in PREINSTALLED:
            continue
        dist = importlib.metadata.distribution(name)
        seen[name] = dist.version
        todo += [r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate(env)]
    return seen


def fetch_wheels(target: Path, python_version: str) -> int:
    """Wheels of the project's packages (less PREINSTALLED) for a manylinux x86-64 CPython, as installed here."""
    pins = closure([p.split("==")[0] for p in project_requirements()], python_version)
    specs = [f"{n}=={v}" for n, v in sorted(pins.items())]
    platforms = [a for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
                 for a in ("--platform", f"{p}_x86_64")]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    target.mkdir(parents=True, exist_ok=True)
    while specs:
        done = subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                                     "--implementation", "cp", *platforms, "-d", str(target), *specs], capture_output=True, text=True)
        sdist_only = re.search(r"No matching distribution found for (\S+)", done.stderr)
        if done.returncode == 0 or sdist_only is None:
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            break
        spec = sdist_only.group(1)  # no wheel published: build one here (pure-Python sdists)
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(target), spec], check=True)
        specs.remove(spec)
    size = sum(f.stat().st_size for f in target.glob("*.whl")) / 2**20
    print(f"{len(list(target.glob('*.whl')))} wheels, {size:.1f} MiB in {target} (Python {python_version}); "
          f"on the GPU machine: benchmarks/gpu.sh --wheels {target}")
    return 0


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at width 4: the pipeline and resume parts, the others in miniature")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"),
                        help=f"folder for {TEXT_FILE} and {JSON_FILE} (default: $OUT, else ./gpu-out)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the generated archive and project (default: a temporary one, removed at the end)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl" if (REPO / ".whl").is_dir() else None,
                        help="install missing packages from these wheels, without an index (default: ./.whl if present)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help=f"seconds for the whole run; part 5 gets what is left (default {GPU.time_limit:.0f}, dry run {DRY.time_limit:.0f})")
    parser.add_argument("--fetch-wheels", type=Path, default=None, metavar="DIR",
                        help="only download into DIR the wheels --wheels needs (run where PyPI is reachable), then exit")
    parser.add_argument("--python-version", default="3.12", help="--fetch-wheels: the GPU machine's Python (KINDS.md: 3.12)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels.resolve(), args.python_version)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu.sh: no CUDA device here (torch {torch.__version__}); nothing checked. --dry-run tries it on the CPU.")
        return 0
    sizes = DRY if args.dry_run else GPU
    if args.time_limit:
        sizes = Sizes(**{**sizes.__dict__, "time_limit": args.time_limit})
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    run = Run(sizes, args.dry_run, args.out.resolve(), work, args.wheels.resolve() if args.wheels else None,
              git=shutil.which("git") is not None)
    os.environ["PATH"] = os.pathsep.join([str(tool_bin(work, run.git)), os.path.dirname(sys.executable), os.environ["PATH"]])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    if not run.git:
        os.environ["GIT_PYTHON_REFRESH"] = "quiet"  # GitPython (imported by MLflow and DVC) must not insist on git
    run.say(f"gpu check: {'dry run on the CPU' if args.dry_run else 'CUDA'}, limit {sizes.time_limit:.0f} s, "
            f"results in {run.out}, work in {work}")
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
