"""`cifar-rounds demo`: the whole pipeline offline, on a generated archive, on CPU.

Copies the pipeline (dvc.yaml, params.yaml, src/) into its own git+DVC
project folder, points `data.url` at a generated CIFAR-format archive, shrinks
the run (narrow model, few epochs) and runs `dvc repro` there. The user's
params.yaml is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cifar_rounds.cli.headline import print_headline
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.inputs import command_parser, folder
from cifar_rounds.core.params import PARAMS_FILE, Params, dump_params, load_params, with_overrides
from cifar_rounds.data.synthetic import write_archive

EXAMPLE = """example:
  cifar-rounds demo                    # offline-demo/: a git + DVC project, trained in about a minute on 2 cores
  cifar-rounds demo --dir /tmp/demo    # elsewhere; a second run reuses the folder"""

PROJECT_FILES = ("dvc.yaml", ".dvcignore", "src", "MLproject", "conda.yaml", "rounds", "sweeps")
ARCHIVE = "cifar-10-synthetic.tar.gz"

# Small enough for 2 CPU cores in about a minute, large enough that every stage runs for real.
TINY_RUN = {
    "data.val_size": 200,
    "model.width": 8,
    "train.batch_size": 64,
    "train.num_epochs": 4,
    "train.lr_milestones": [2],
    "train.patience": 3,
    "train.eval_batch_size": 500,
    "train.device": "cpu",
    "train.deterministic": True,
    "diagnostics.noise_interval": 5,
    # every diagnostic measured, at little cost (at width 8, on one thread, a Hessian product takes about 0.2 s on
    # 32 images and 0.5 s on 64): at 64 images and 5 + 2 products, sharpness took most of a tiny training
    "diagnostics.sharpness_samples": 32,
    "diagnostics.power_iterations": 3,
    "diagnostics.hutchinson_samples": 1,
}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def dvc(*args: str, cwd: Path) -> None:
    """DVC from this interpreter's environment, whose `python` also runs the stages, whatever PATH says."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env={**os.environ, "PATH": path})
    if done.returncode != 0:  # DVC has said why above
        raise StageError(f"dvc {' '.join(args)} failed in {cwd} (exit status {done.returncode})")


def init_project(source: Path, target: Path, params: Params) -> None:
    """A fresh git + DVC project holding the pipeline and the given params."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = source / name, target / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    dump_params(params, target / PARAMS_FILE)
    if not (target / ".git").exists():
        git("init", "-q", "-b", "main", cwd=target)
        git("config", "user.email", "pipeline@localhost", cwd=target)
        git("config", "user.name", "cifar-rounds", cwd=target)
    if not (target / ".dvc").exists():
        dvc("init", "-q", cwd=target)
        dvc("config", "core.analytics", "false", cwd=target)
    (target / ".gitignore").write_text(
        "/mlflow.db\n/optuna.db\n/.*.lock\n/mlartifacts/\ndvc_plots/\n/" + ARCHIVE + "\n"
    )


def commit_all(target: Path, message: str) -> None:
    """Commit everything git sees in the project, if anything changed (DVC's outputs are git-ignored)."""
    git("add", "-A", cwd=target)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=target, capture_output=True, text=True, check=True)
    if status.stdout.strip():
        git("commit", "-q", "-m", message, cwd=target)


def offline_params(base: Params, archive: Path, md5: str, overrides: dict[str, object]) -> Params:
    return with_overrides(base, {**TINY_RUN, "data.url": str(archive.resolve()), "data.md5": md5, **overrides})


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = command_parser(prog, __doc__.splitlines()[0], EXAMPLE)
    parser.add_argument("--dir", type=Path, default=Path("offline-demo"), help="project folder to create or reuse")
    parser.add_argument("--train-size", type=int, default=2000, help="generated training images")
    parser.add_argument("--test-size", type=int, default=500, help="generated test images")
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").exists():
        raise StageError("no dvc.yaml here: run the offline demo from the repository root (cifar-rounds demo)")
    target = folder(args.dir, "the project folder to create or reuse").resolve()
    params = load_params()
    target.mkdir(parents=True, exist_ok=True)
    archive = target / ARCHIVE
    md5 = write_archive(archive, args.train_size, args.test_size, seed=0)
    init_project(Path.cwd(), target, offline_params(params, archive, md5, {}))
    commit_all(target, "offline demo: pipeline and params")  # a real repository: diffs, rounds and tags work
    dvc("config", "--local", "core.autostage", "true", cwd=target)  # DVC stages what it writes: no "git add" advice
    dvc("repro", cwd=target)
    commit_all(target, "offline demo: a run of the pipeline")
    print(f"offline run complete in {target}:")
    print_headline(target, load_params(target / PARAMS_FILE))


if __name__ == "__main__":
    run_stage(main)
