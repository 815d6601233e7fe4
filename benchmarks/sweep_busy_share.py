"""How busy a sweep keeps its trainings: the share of its time during which `--workers` trainings ran, and what each
trial costs besides its training.

    python benchmarks/sweep_busy_share.py [--trials 6] [--workers 2] [--ready N] [--epochs 12]
                                          [--train-images 4000] [--width 16] [--keep DIR]

Builds a throwaway git + DVC project on a generated CIFAR-format archive (its
download and split stages run and committed first, as a user's baseline is), then
runs the real sweep,
`python -m cifar_rounds.search.sweep busy.yaml --workers N [--ready R]`, on trials of equal
length (fixed epochs, no pruner, one batch size, the learning rate searched) so
that the trainings end together. A training is a trial's MLflow run, start to end.
Prints the share of the time from the first training's start to the last one's
end during which N trainings ran (and up to the last training's start: after it,
a worker that ends has nothing left to run), the sweep's wall time, the load
average while it ran, and each trial's overhead from its worker's lines (stamped
as they arrive) and its run's times: before its training (the clone's reset,
`dvc exp run`'s set-up, the data stages found unchanged, the train stage's start-up
up to its MLflow run, and a ready worker's wait for a training place) and after it
(DVC saving the experiment, the push to the repository, the study told).
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
from datetime import date
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.cli.demo import commit_all, init_project, offline_params
from cifar_rounds.core.params import load_params
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.report import most_running, share_running

REPO = Path(__file__).resolve().parents[1]
STUDY = "busy"
# a worker's lines: "sweep: trial 3 (busy-t003) starts in w1", "sweep: trial 3 (busy-t003) complete"
TRIAL_LINE = re.compile(r"^sweep: trial (\d+) \(\S+\) (starts|complete|pruned|failed)")


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


def trainings(project: Path) -> dict[int, tuple[int, int]]:
    """Each trial's finished MLflow run: start and end (ms), by trial number."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    runs = client.search_runs([experiment], f"tags.sweep = '{STUDY}'")
    return {
        int(r.data.tags["sweep.trial"]): (r.info.start_time, r.info.end_time)
        for r in runs
        if "sweep.trial" in r.data.tags and r.info.status == "FINISHED"
    }


def stamped_lines(stream, into: list[tuple[float, str]]) -> None:
    """Each line of `stream` with the time (ms) it arrived."""
    for line in stream:
        into.append((time.time() * 1000, line.rstrip("\n")))


def overheads(lines: list[tuple[float, str]], runs: dict[int, tuple[int, int]]) -> list[tuple[float, float]]:
    """(before, after) its training of each trial, s: from its worker's start line to its run's start, and from its
    run's end to its worker's end line."""
    starts, ends = {}, {}
    for at, line in lines:
        if m := TRIAL_LINE.match(line):
            (starts if m[2] == "starts" else ends)[int(m[1])] = at
    return [
        ((runs[n][0] - starts[n]) / 1000, (ends[n] - runs[n][1]) / 1000)
        for n in sorted(runs)
        if n in starts and n in ends
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ready", type=int, help="the sweep's --ready (default: its own)")
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
        cmd += [] if args.ready is None else ["--ready", str(args.ready)]
        loads, stop = [os.getloadavg()[0]], threading.Event()
        sampler = threading.Thread(target=load_sampler, args=(loads, stop), daemon=True)
        sampler.start()
        began, lines = time.time(), []
        sweep = subprocess.Popen(
            cmd, cwd=project, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        stamped_lines(sweep.stdout, lines)
        code = sweep.wait()
        wall = time.time() - began
        stop.set()
        if code != 0:
            sys.exit(f"the sweep failed ({code}):\n" + "\n".join(line for _, line in lines[-40:]))
        runs = trainings(project)
    spans = list(runs.values())
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
    costs = overheads(lines, runs)
    before, after = [b for b, _ in costs], [a for _, a in costs]
    print(
        f"per trial, besides its training (s, median and range of {len(costs)}): "
        f"before {statistics.median(before):.1f} "
        f"({min(before):.1f} to {max(before):.1f}), after {statistics.median(after):.1f} "
        f"({min(after):.1f} to {max(after):.1f})"
    )


if __name__ == "__main__":
    main()
