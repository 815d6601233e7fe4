"""`cifar-rounds COMMAND ...`: one command for what a user does with the rounds.

Each command hands its arguments, untouched, to the `main(argv, prog)` of the module that does
the work, which defines and checks them: `run` is `analysis.rounds run`, `report` is
`analysis.report`, `sweep` and `promote` are `search.sweep`, and so on. No argument is defined
twice, so a flag added there (`run --workers K`) works here as it is. The modules are imported
by the command that needs them: `cifar-rounds --help` does not wait for MLflow or Optuna to load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

from cifar_rounds.core.errors import run_stage
from cifar_rounds.core.inputs import command_parser

PROG = "cifar-rounds"


class Command(NamedTuple):
    summary: str
    example: str
    handler: Callable[[list[str]], None]


def run(args: list[str]) -> None:
    from cifar_rounds.analysis.rounds import main as rounds_main

    rounds_main(["run", *args], prog=PROG)  # its subcommand's prog is then `cifar-rounds run`


def report(args: list[str]) -> None:
    from cifar_rounds.analysis.report import main as report_main

    report_main(args, prog=f"{PROG} report")


def sweep(args: list[str]) -> None:
    from cifar_rounds.search.sweep import main as sweep_main

    sweep_main(args, prog=f"{PROG} sweep")


def promote(args: list[str]) -> None:
    """`promote SWEEP_FILE NAME [--force]`: the sweep's `--no-run --promote NAME`, the study as it is."""
    parser = command_parser(
        f"{PROG} promote",
        "write a sweep's best complete trial onto its baseline preset as rounds/NAME.yaml",
        f"example:\n  {COMMANDS['promote'].example}",
    )
    parser.add_argument("sweep_file", metavar="SWEEP_FILE", help="the sweep file, e.g. sweeps/round-3.yaml")
    parser.add_argument("name", metavar="NAME", help="the new preset's name: rounds/NAME.yaml")
    parser.add_argument("--force", action="store_true", help="over an existing preset (kept as a backup)")
    parsed = parser.parse_args(args)
    from cifar_rounds.search.sweep import main as sweep_main

    forced = ["--force"] if parsed.force else []
    sweep_main([parsed.sweep_file, "--no-run", "--promote", parsed.name, *forced], prog=f"{PROG} promote")


def show(args: list[str]) -> None:
    """`show PRESET` (its values) or `show --headline` (what the last run of the pipeline here ended with)."""
    parser = command_parser(
        f"{PROG} show",
        "a preset's values, or the headline of the last run of the pipeline in this repository",
        f"examples:\n  {COMMANDS['show'].example}\n  {PROG} show --headline",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("preset", nargs="?", metavar="PRESET", help="a preset in rounds/, e.g. round-2")
    what.add_argument("--headline", action="store_true", help="test and validation accuracy, epochs, the MLflow run")
    parsed = parser.parse_args(args)
    if parsed.headline:
        from cifar_rounds.cli.headline import main as headline_main

        headline_main([], prog=f"{PROG} show --headline")
    else:
        from cifar_rounds.analysis.rounds import main as rounds_main

        rounds_main(["show", parsed.preset], prog=PROG)


def check(args: list[str]) -> None:
    from cifar_rounds.cli.check import main as check_main

    check_main(args, prog=f"{PROG} check")


def demo(args: list[str]) -> None:
    from cifar_rounds.cli.demo import main as demo_main

    demo_main(args, prog=f"{PROG} demo")


def relocate(args: list[str]) -> None:
    from cifar_rounds.cli.relocate import main as relocate_main

    relocate_main(args, prog=f"{PROG} relocate")


COMMANDS = {
    "demo": Command("the whole pipeline offline, on generated data, in offline-demo/", f"{PROG} demo", demo),
    "run": Command(
        "train a round (a preset of rounds/) as DVC experiments; --seeds N replicates",
        f"{PROG} run round-2 --epochs 10 --seeds 3",
        run,
    ),
    "report": Command(
        "compare two rounds: the verdict, where the aliases should point, the next round",
        f"{PROG} report round-1 round-2",
        report,
    ),
    "sweep": Command(
        "search the next round with Optuna, pruned", f"{PROG} sweep sweeps/round-3.yaml --workers 2", sweep
    ),
    "promote": Command(
        "a sweep's best trial as a new preset, rounds/NAME.yaml", f"{PROG} promote sweeps/round-3.yaml round-3", promote
    ),
    "show": Command("a preset's values (or --headline: the last run's)", f"{PROG} show round-2", show),
    "check": Command(
        "validate a params file, a preset (--preset) or a sweep file (--sweep)", f"{PROG} check params.yaml", check
    ),
    "relocate": Command(
        "after copying or moving the repository, point its MLflow store into it", f"{PROG} relocate", relocate
    ),
}


def listing() -> str:
    """The commands, each with what it does and an example."""
    lines = ["commands (each has --help):"]
    for name, command in COMMANDS.items():
        lines += [f"  {name:<9} {command.summary}", f"  {'':<9}   {command.example}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(PROG, "Tune ResNet-18 on CIFAR-10 in rounds, with DVC, MLflow and Optuna.", listing())
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (COMMAND --help)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.error(f"a COMMAND is required: {', '.join(COMMANDS)}")
    parsed = parser.parse_args(argv)
    COMMANDS[parsed.command].handler(parsed.args)


def entry() -> None:
    """The `cifar-rounds` console script (and `python -m cifar_rounds`)."""
    run_stage(main)
