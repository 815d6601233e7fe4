"""Epochs a sweep trains, and the best objective it finds, with the median pruner and without.

    python benchmarks/sweep_pruning.py [--trials 12] [--epochs 8] [--train-images 2000] [--seeds 3]

Both sweeps propose the same configurations in the same order (the random sampler
with one seed does not look at results), so they differ only in pruning. Each
trial is the real train stage (`train.fit`, reporting to its Optuna trial through
params.yaml's `sweep` section, exactly as a worker's experiment does; then told to the
study as the worker tells it) on a
generated CIFAR-format archive split by the real download and split stages; the
workers and DVC are left out, as they cost the same in both sweeps. Seed noise: the
validation accuracy of the best configuration over `--seeds` training seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import optuna
import torch

from cifar_rounds.cli.demo import offline_params
from cifar_rounds.core.files import file_md5
from cifar_rounds.core.params import dump_params, load_params, with_overrides
from cifar_rounds.data.dataset import Split
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.spec import Objective
from cifar_rounds.search.worker import TrialFailed, reported
from cifar_rounds.stages.train import fit
from cifar_rounds.training.checkpoint import Outputs
from cifar_rounds.training.pruners import MedianPruner, NoPruner
from cifar_rounds.training.runtime import configure_cpu
from cifar_rounds.training.trial import OBJECTIVE_ATTR, PRUNER_ATTR

CPU = torch.device("cpu")
SPACE = {"train.learning_rate": (1e-4, 0.3), "train.weight_decay": (1e-5, 1e-2)}  # log-uniform


def make_split(folder: Path, train_images: int, epochs: int) -> tuple[object, Path]:
    """Params for the benchmark and the split the real stages make from a generated archive."""
    archive = folder / "archive.tar.gz"
    md5 = write_archive(archive, train_images, train_images // 4, seed=0)
    params = offline_params(
        load_params(Path(__file__).parents[1] / "params.yaml"),
        archive,
        md5,
        {
            "data.val_size": train_images // 5,
            "train.num_epochs": epochs,
            "train.lr_milestones": [epochs * 3 // 4],
            "train.patience": epochs,
            "diagnostics.sharpness": False,
            "diagnostics.noise_scale": False,
            "tracking.log_model": False,
            "tracking.tracking_uri": f"sqlite:///{folder}/mlflow.db",
        },
    )
    dump_params(params, folder / "params.yaml")
    for stage, args in (("download", ["--out", "raw"]), ("split", ["--raw", "raw", "--out", "split.npz"])):
        subprocess.run(
            [sys.executable, "-m", f"cifar_rounds.stages.{stage}", *args], cwd=folder, check=True, capture_output=True
        )
    return params, folder / "split.npz"


def run_trial(params, split: Split, digest: str, folder: Path, name: str) -> dict:
    out = Outputs(folder / name, folder / f"{name}.csv", folder / f"{name}.json")
    return fit(params, split, digest, out, CPU)


def sweep(pruned: bool, args, params, split: Split, digest: str, folder: Path) -> dict:
    study_name = "pruned" if pruned else "unpruned"
    storage = f"sqlite:///{folder}/optuna.db"
    pruner = MedianPruner(kind="median", startup_trials=2, warmup_epochs=2) if pruned else NoPruner(kind="none")
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=args.sampler_seed),
        pruner=pruner.build(),
    )
    study.set_user_attr(OBJECTIVE_ATTR, Objective().model_dump())
    study.set_user_attr(PRUNER_ATTR, pruner.model_dump())
    start, epochs = time.perf_counter(), 0
    for _ in range(args.trials):
        trial = study.ask()
        values = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in SPACE.items()}
        trial_params = with_overrides(
            params,
            {
                **values,
                "sweep.study": study_name,
                "sweep.trial": trial.number,
                "sweep.storage": storage,
                "tracking.run_name": f"{study_name}-{trial.number}",
            },
        )
        summary = run_trial(trial_params, split, digest, folder, f"{study_name}-{trial.number}")
        try:  # as its worker tells the study once the trial's experiment is saved
            study.tell(trial.number, reported(study._storage, study_name, trial.number))
        except optuna.TrialPruned:
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
        except TrialFailed:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        epochs += summary["stopped_epoch"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value)
    return {
        "epochs": epochs,
        "best": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
        "seconds": time.perf_counter() - start,
    }


def seed_noise(best_params: dict, args, params, split: Split, digest: str, folder: Path) -> list[float]:
    values = []
    for seed in range(args.seeds):
        p = with_overrides(params, {**best_params, "train.seed": 100 + seed, "tracking.run_name": f"noise-{seed}"})
        summary = run_trial(p, split, digest, folder, f"noise-{seed}")
        history = (folder / f"noise-{seed}.csv").read_text().splitlines()
        header = history[0].split(",")
        accuracies = [float(row.split(",")[header.index("val_accuracy")]) for row in history[1:]]
        values.append(max(accuracies[: summary["stopped_epoch"]]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3, help="replicates of the best configuration, for seed noise")
    parser.add_argument("--sampler-seed", type=int, default=0)
    args = parser.parse_args()
    configure_cpu(CPU)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["DVC_ROOT"] = tmp  # the stages' repository root: the store and the study live here
        os.chdir(folder)
        params, split_file = make_split(folder, args.train_images, args.epochs)
        split, digest = Split.load(split_file), file_md5(split_file)
        results = {pruned: sweep(pruned, args, params, split, digest, folder) for pruned in (False, True)}
        best_values = {k: v for k, v in results[False]["best_params"].items()}
        noise = seed_noise(best_values, args, params, split, digest, folder)
    print(
        f"# sweep pruning benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{args.trials} trials of at most {args.epochs} epochs, ResNet-18 width {params.model.width}, "
        f"{args.train_images} generated training images, random sampler seed {args.sampler_seed}"
    )
    print("| pruner | epochs trained | trials pruned | best val_accuracy (trial) | wall s |")
    print("|---|---|---|---|---|")
    for pruned, r in results.items():
        print(
            f"| {'median' if pruned else 'none'} | {r['epochs']} | {r['pruned']} | {r['best']:.4f} ({r['best_trial']}) "
            f"| {r['seconds']:.0f} |"
        )
    ratio = results[False]["epochs"] / results[True]["epochs"]
    print(
        f"epochs: {ratio:.2f}x fewer with the pruner; seed noise of the best configuration's val_accuracy over "
        f"{args.seeds} seeds: mean {statistics.mean(noise):.4f}, std {statistics.stdev(noise):.4f} ({noise})"
    )


if __name__ == "__main__":
    main()
