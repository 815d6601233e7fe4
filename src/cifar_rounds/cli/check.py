"""`cifar-rounds check`: validate params files, presets and sweep files before anything runs.

Each is read by the loader the commands that use it call (`core.params.load_params`,
`analysis.rounds.load_preset`, `search.spec.load_sweep`), so what passes here passes there.
The kind is said by the argument, never guessed from a file's name or keys: a positional
FILE is a params file, `--preset NAME` a preset of rounds/, `--sweep FILE` a sweep file.
One line per file: `FILE: valid`, or `error: ...` naming the file or field; the exit status is 1
if any is bad.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cifar_rounds.analysis.rounds import PRESETS_DIR, load_preset
from cifar_rounds.core.errors import ParamsError, StageError, run_stage
from cifar_rounds.core.inputs import FileArgumentError, command_parser
from cifar_rounds.core.params import PARAMS_FILE, load_params
from cifar_rounds.search.spec import load_sweep

EXAMPLE = """examples:
  cifar-rounds check                                # params.yaml
  cifar-rounds check params.yaml other.yaml         # params files
  cifar-rounds check --preset round-2               # rounds/round-2.yaml on top of params.yaml, as `run` takes it
  cifar-rounds check --sweep sweeps/round-3.yaml    # a sweep file against what its trials would get"""


def sweep_checked(path: Path) -> object:
    """The sweep file checked as `cifar-rounds sweep` checks it: on params.yaml and the presets it names."""
    return load_sweep(path, load_params(), load_preset)


def checks(params: list[Path], presets: list[str], sweeps: list[Path]) -> list[tuple[str, Callable[[], object]]]:
    """(what, its loader) for each argument, in the order params files, presets, sweep files."""
    found = [(str(p), partial(load_params, p)) for p in params]
    found += [(str(PRESETS_DIR / f"{name}.yaml"), partial(load_preset, name)) for name in presets]
    return found + [(str(s), partial(sweep_checked, s)) for s in sweeps]


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = command_parser(prog, __doc__.splitlines()[0], EXAMPLE)
    parser.add_argument(
        "params", nargs="*", type=Path, metavar="FILE", help=f"a params file (default: {PARAMS_FILE} if nothing else)"
    )
    parser.add_argument(
        "--preset", action="append", default=[], metavar="NAME", help=f"a preset in {PRESETS_DIR}/, repeatable"
    )
    parser.add_argument("--sweep", action="append", default=[], type=Path, metavar="FILE", help="a sweep, repeatable")
    args = parser.parse_args(argv)
    params = args.params or ([] if args.preset or args.sweep else [PARAMS_FILE])
    bad = 0
    for what, load in checks(params, args.preset, args.sweep):
        try:
            load()
        except (ParamsError, StageError, FileArgumentError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            bad += 1
        else:
            print(f"{what}: valid", flush=True)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    run_stage(main)
