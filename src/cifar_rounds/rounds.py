"""`python -m cifar_rounds.rounds run round-1`: the seed's rounds as named DVC experiments.

Every value of the preset is passed with -S, because `dvc exp run -S` in the
workspace keeps earlier changes to params.yaml: a round is fully defined by
its preset plus the overrides given here, never by what ran before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from cifar_rounds.cli import StageError, run_stage
from cifar_rounds.params import load_params, with_overrides

# The seed analysis: round 1 as it ran, round 2 as it proposes.
PRESETS: dict[str, dict[str, object]] = {
    "round-1": {
        "train.learning_rate": 0.01, "train.lr_milestones": [60, 120, 160], "train.lr_gamma": 0.1,
        "train.weight_decay": 0.0001, "train.batch_size": 128, "train.num_epochs": 200,
        "train.patience": 30, "train.min_delta": 0.001,
    },
    "round-2": {
        "train.learning_rate": 0.05, "train.lr_milestones": [60, 120, 160], "train.lr_gamma": 0.2,
        "train.weight_decay": 0.0005, "train.batch_size": 96, "train.num_epochs": 250,
        "train.patience": 35, "train.min_delta": 0.0005,
    },
}


def parse_override(text: str) -> tuple[str, object]:
    """`train.num_epochs=3` -> ("train.num_epochs", 3); values are JSON where they parse, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise StageError(f"override {text!r}: expected KEY=VALUE, e.g. train.num_epochs=3")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def exp_run_command(name: str, values: dict[str, object], mode: list[str]) -> list[str]:
    sets = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    return [sys.executable, "-m", "dvc", "exp", "run", "-n", name, *mode, *(a for s in sets for a in ("-S", s))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a preset as a named DVC experiment")
    run.set_defaults(handler=run_preset)
    run.add_argument("preset", choices=sorted(PRESETS))
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override on top of the preset (e.g. train.num_epochs=3); repeatable")
    run.add_argument("-n", "--name", help="experiment name (default: the preset's)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--queue", action="store_true", help="queue it (then: dvc queue start)")
    where.add_argument("--temp", action="store_true", help="run in a temporary copy; the workspace stays as it is")
    show = sub.add_parser("show", help="print a preset's values")
    show.add_argument("preset", choices=sorted(PRESETS))
    show.set_defaults(handler=lambda args: print(json.dumps(PRESETS[args.preset], indent=2)))
    args = parser.parse_args()
    args.handler(args)


def run_preset(args: argparse.Namespace) -> None:
    values = {**PRESETS[args.preset], **dict(parse_override(s) for s in args.set)}
    with_overrides(load_params(), values)  # refuse bad values before DVC touches anything
    mode = ["--queue"] * args.queue + ["--temp"] * args.temp
    result = subprocess.run(exp_run_command(args.name or args.preset, values, mode))
    if result.returncode != 0:
        raise StageError(f"dvc exp run failed for {args.name or args.preset} (exit {result.returncode})")


if __name__ == "__main__":
    run_stage(main)
