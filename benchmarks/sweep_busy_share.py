"""How busy a sweep keeps its workers: the share of its time during which `--workers` trainings ran.

    python benchmarks/sweep_busy_share.py [--trials 6] [--workers 2] [--epochs 12] [--train-images 4000]
                                          [--width 16] [--keep DIR]

Builds a throwaway git + DVC project on a generated CIFAR-format archive (its
download and split stages run and committed first, as a user's baseline is), then
runs the real driver,
`python -m cifar_rounds.search.sweep busy.yaml --workers N`, on trials of equal
length (fixed epochs, no pruner, one batch size, the learning rate searched) so
that the workers end together. A training is a trial's MLflow run, start to end.
Prints the share of the time from the first training's start to the last one's
end during which N trainings ran (and up to the last training's start: after it,
a worker that ends has nothing left to run), the sweep's wall time, the load
average while it ran, and each worker's gap between a training's end and its
next one's start, split by the times in the trainings' MLflow runs and in DVC's
queue worker logs into: to evaluate (the train process's exit, DVC recording the
train stage, the evaluate stage up to its results in the run); saving (DVC
recording evaluate and saving the experiment); waiting for a task (the queue
empty: the driver had not queued the next trial); before training (DVC's
temporary workspace, the data stages found unchanged, the train stage's start-up
up to its MLflow run).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.core.params import load_params
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.report import most_running, share_running
from cifar_rounds.stages.demo import commit_all, init_project, offline_params

REPO = Path(__file__).resolve().parents[1]
STUDY = "busy"
# celery's worker log: "[2026-12-01 20:00:00,123: INFO/MainProcess] Task ...run_exp[id] received"
TASK_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] Task \S+\[([\w-]+)\] (received|succeeded)"
)


def environment() -> dict[str, str]:
    """This interpreter's environment first on PATH (DVC runs `python -m ...` stages), no MLflow/DVC settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}


def make_project(project: Path, args) -> None:
    archive = project.parent / "archive.tar.gz"
    schedule = {
        "train.num_epochs": args.epochs,
        "train.lr_milestones": [args.epochs * 3 // 4] if args.epochs > 1 else [],
        "train.patience": args.epochs,  # no early stop: every trial trains every epoch
        "train.batch_size": 96,
    }
    md5 = write_archive(archive, args.train_images + args.val_images, 500, seed=0)
    params = offline_params(
        load_params(REPO / "params.yaml"),
        archive,
        md5,
        {
            "data.val_size": args.val_images,
            "model.width": args.width,
            **schedule,
            "diagnostics.sharpness": False,
            "diagnostics.noise_scale": False,
            "tracking.log_model": False,
        },
    )
    init_project(REPO, project, params)
    sweep = {
        "study": STUDY,
        "baseline": "round-2",
        "trials": args.trials,
        "enqueue": [],
        "fixed": schedule,
        "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        "sampler": {"kind": "random", "seed": 0},
        "pruner": {"kind": "none"},
    }
    (project / f"{STUDY}.yaml").write_text(yaml.safe_dump(sweep))
    commit_all(project, "baseline")
    # the data stages' outputs in DVC's cache and dvc.lock: the experiments find them unchanged
    subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "split"], cwd=project, env=environment(), check=True, capture_output=True
    )
    commit_all(project, "the data stages")


def load_sampler(samples: list[float], stop: threading.Event, every_s: float = 10.0) -> None:
    while not stop.wait(every_s):
        samples.append(os.getloadavg()[0])


def trainings(project: Path) -> list[tuple[int, int, int | None]]:
    """Each trial's finished MLflow run: start, end and when the evaluate stage logged to it (ms), by start."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    runs = client.search_runs([experiment], f"tags.sweep = '{STUDY}'")
    out = []
    for r in runs:
        if "sweep.trial" in r.data.tags and r.info.status == "FINISHED":
            evaluated = [m.timestamp for m in client.get_metric_history(r.info.run_id, "test_accuracy")]
            out.append((r.info.start_time, r.info.end_time, max(evaluated, default=None)))
    return sorted(out)


def queue_tasks(project: Path) -> list[tuple[float, float, str]]:
    """(received, succeeded, worker) of each experiment DVC's queue workers ran (ms), from their celery logs."""
    seen: dict[str, dict[str, float | str]] = {}
    for log in (project / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.out"):
        for line in log.read_text(errors="replace").splitlines():
            if m := TASK_LINE.match(line):
                at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
                seen.setdefault(m[2], {"worker": log.stem})[m[3]] = at
    return sorted((t["received"], t["succeeded"], t["worker"]) for t in seen.values() if len(t) == 3)


def gap_lines(runs: list[tuple[int, int, int | None]], tasks: list[tuple[float, float, str]]) -> list[str]:
    """Each worker's gap between a training's end and its next one's start, and where it went."""
    lines = [
        "| worker | gap s | to evaluate s | saving s | waiting for a task s | before training s |",
        "|---|---|---|---|---|---|",
    ]
    held, free = [], list(tasks)  # each training with the queue task that ran it: the first to end that holds it
    for run in sorted(runs, key=lambda r: r[1]):
        task = min((t for t in free if t[0] <= run[0] and run[1] <= t[1] + 1000), key=lambda t: t[1], default=None)
        if task is not None:  # (the logs' times are rounded to ms)
            free.remove(task)
            held.append((task, run))
    for worker in sorted({task[2] for task, _ in held}):
        chain = sorted((task, run) for task, run in held if task[2] == worker)
        for (this, (_, end, evaluated)), (after, (start, _, _)) in zip(chain, chain[1:]):
            ev = f"{(evaluated - end) / 1000:.1f}" if evaluated else "?"
            save = f"{(this[1] - evaluated) / 1000:.1f}" if evaluated else "?"
            lines.append(
                f"| {worker.removeprefix('dvc-exp-')} | {(start - end) / 1000:.1f} | {ev} | {save} "
                f"| {(after[0] - this[1]) / 1000:.1f} | {(start - after[0]) / 1000:.1f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12, help="every trial trains exactly this many")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = (args.keep or Path(tmp) / "p").resolve()
        project.mkdir(parents=True)
        make_project(project, args)
        cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", f"{STUDY}.yaml", "--workers", str(args.workers)]
        loads, stop = [os.getloadavg()[0]], threading.Event()
        sampler = threading.Thread(target=load_sampler, args=(loads, stop), daemon=True)
        sampler.start()
        began = time.time()
        result = subprocess.run(cmd, cwd=project, env=environment(), capture_output=True, text=True)
        wall = time.time() - began
        stop.set()
        if result.returncode != 0:
            sys.exit(f"the sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        runs = trainings(project)
        tasks = queue_tasks(project)
    spans = [(s, e) for s, e, _ in runs]
    share = share_running(spans, args.workers)
    first = min(s for s, _ in spans) / 1000 - began
    print(
        f"# sweep busy share, {date.today()}, {os.cpu_count()} CPUs, load average (1 min) while it ran: "
        f"mean {statistics.mean(loads):.1f}, max {max(loads):.1f}"
    )
    print(
        f"`{' '.join(['python', '-m', *cmd[2:]])}`: {args.trials} trials of {args.epochs} epochs, ResNet-18 width "
        f"{args.width}, {args.train_images} training images"
    )
    durations = [(e - s) / 1000 for s, e in spans]
    print(
        f"sweep wall time {wall:.0f} s; first training started {first:.0f} s in; {len(spans)} trainings of "
        f"{statistics.mean(durations):.0f} s on average ({min(durations):.0f} to {max(durations):.0f}); "
        f"at most {most_running(spans)} at once"
    )
    print(f"**{args.workers} trainings running {share:.1%} of the time after the first training started**")
    last_start = max(s for s, _ in spans)  # then nothing is left to give a worker that ends: the sweep drains
    steady = share_running([(s, min(e, last_start)) for s, e in spans if s < last_start], args.workers)
    print(f"{args.workers} trainings running {steady:.1%} of the time from the first training's start to the last's")
    print(*gap_lines(runs, tasks), sep="\n")


if __name__ == "__main__":
    main()
