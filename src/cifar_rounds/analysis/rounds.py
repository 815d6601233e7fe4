"""`python -m cifar_rounds.analysis.rounds run round-1`: the founding analysis's rounds as named DVC experiments.

A round's values live in `rounds/<name>.yaml` (a partial params.yaml, validated
by `Params`). Every value of the preset is passed with -S, because `dvc exp run
-S` in the workspace keeps earlier changes to params.yaml: a round is fully
defined by its preset plus the overrides given here, never by what ran before.
Replicates (`--seeds N`) differ only in `train.seed` and are named NAME-s0 ... NAME-s{N-1}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.inputs import read_text
from cifar_rounds.core.params import PARAMS_FILE, ParamsError, flatten, load_params, read_yaml, with_overrides

PRESETS_DIR = Path("rounds")
EXAMPLE = "-S train.num_epochs=3 -S train.lr_milestones=[1,2]"


def preset_names(folder: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_preset(name: str, folder: Path = PRESETS_DIR) -> dict[str, object]:
    """A preset's values under their dotted names; unknown names and bad values are refused by name."""
    path = folder / f"{name}.yaml"
    if not path.exists():
        raise StageError(f"{path}: no such preset; presets here: {', '.join(preset_names(folder)) or 'none'}")
    raw = read_yaml(read_text(path, "a preset: sections of params.yaml, e.g. train: {learning_rate: 0.05}"), path)
    if not isinstance(raw, dict):
        raise StageError(f"{path}: expected sections of params.yaml, e.g. train: {{learning_rate: 0.05}}")
    values = flatten(raw)
    try:
        with_overrides(load_params(), values)
    except ParamsError as error:
        raise StageError(f"{path}: {error}") from None
    return values


def parse_override(text: str) -> tuple[str, object]:
    """`train.num_epochs=3` -> ("train.num_epochs", 3); values are JSON where they parse, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise StageError(f"override {text!r}: expected KEY=VALUE, e.g. train.num_epochs=3")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def scaled_milestones(milestones: list[int], old_epochs: int, new_epochs: int) -> list[int]:
    """Milestones at the same fractions of a run of `new_epochs` (distinct, within [1, new_epochs))."""
    scaled = sorted({max(1, round(m * new_epochs / old_epochs)) for m in milestones})
    return [m for m in scaled if m < new_epochs]


def round_values(preset: str, sets: list[str], epochs: int | None) -> dict[str, object]:
    """The preset, `--epochs` with its scaled milestones, then the -S overrides; validated."""
    values: dict[str, object] = {**load_preset(preset), "tracking.round": preset}
    if epochs is not None:
        base = with_overrides(load_params(), values).train
        values.update(
            {
                "train.num_epochs": epochs,
                "train.lr_milestones": scaled_milestones(base.lr_milestones, base.num_epochs, epochs),
            }
        )
    values.update(dict(parse_override(s) for s in sets))
    with_overrides(load_params(), values)  # refuse bad values before DVC touches anything
    return values


def replicates(name: str, values: dict[str, object], seeds: int | None) -> list[tuple[str, dict[str, object]]]:
    """(experiment name, values) per run: one run (seed 0 unless -S sets it), or `seeds` replicates (0..seeds-1).

    The seed is always set: a workspace run would otherwise inherit the last replicate's.
    """
    if seeds is None:
        return [(name, {"train.seed": 0, **values})]
    return [(f"{name}-s{seed}", {**values, "train.seed": seed}) for seed in range(seeds)]


def exp_run_command(name: str, values: dict[str, object], mode: list[str]) -> list[str]:
    sets = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    return [sys.executable, "-m", "dvc", "exp", "run", "-n", name, *mode, *(a for s in sets for a in ("-S", s))]


def run_experiment(name: str, values: dict[str, object], mode: list[str]) -> None:
    """`dvc exp run`; on failure params.yaml is put back byte for byte (DVC rewrites it before running)."""
    before = PARAMS_FILE.read_bytes()
    result = subprocess.run(exp_run_command(name, values, mode))
    if result.returncode != 0:
        PARAMS_FILE.write_bytes(before)
        hint = " (it exists: add --force to replace it)" if "--force" not in mode else ""
        raise StageError(f"dvc exp run failed for {name} (exit {result.returncode}){hint}; params.yaml is as it was")


def run_preset(args: argparse.Namespace) -> None:
    values = round_values(args.preset, args.set + args.overrides, args.epochs)
    mode = ["--queue"] * args.queue + ["--temp"] * args.temp + ["--force"] * args.force
    for name, run_values in replicates(args.name or args.preset, values, args.seeds):
        run_experiment(name, run_values, mode)
    if args.queue:
        print(
            "queued; start the workers with: dvc queue start -j 2 (and watch: dvc queue status); on a CPU, "
            "give each its share of the cores: OMP_NUM_THREADS=1 dvc queue start -j 2 on 2 cores"
        )


def show_preset(args: argparse.Namespace) -> None:
    print(json.dumps(load_preset(args.preset), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a preset as a named DVC experiment (or --seeds replicates)")
    run.set_defaults(handler=run_preset)
    run.add_argument("preset", help=f"a preset in {PRESETS_DIR}/: {', '.join(preset_names()) or 'none yet'}")
    run.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override on top of the preset, repeatable; e.g. {EXAMPLE}",
    )
    run.add_argument(
        "--overrides",
        type=str.split,
        default=[],
        metavar="'KEY=VALUE ...'",
        help="more overrides in one whitespace-separated string (for MLproject)",
    )
    run.add_argument(
        "--epochs", type=int, help="train this many epochs, with the milestones scaled to the same fractions"
    )
    run.add_argument("--seeds", type=int, help="run this many replicates (train.seed 0..N-1), named NAME-s0 ...")
    run.add_argument("-n", "--name", help="experiment name (default: the preset's)")
    run.add_argument("-f", "--force", action="store_true", help="replace an experiment of the same name")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--queue", action="store_true", help="queue it (then: dvc queue start)")
    where.add_argument("--temp", action="store_true", help="run in a temporary copy; the workspace stays as it is")
    show = sub.add_parser("show", help="print a preset's values")
    show.add_argument("preset", help="a preset name")
    show.set_defaults(handler=show_preset)
    args = parser.parse_args()
    if getattr(args, "seeds", None) is not None and args.seeds < 1:
        parser.error("--seeds: at least 1")
    args.handler(args)


if __name__ == "__main__":
    run_stage(main)
