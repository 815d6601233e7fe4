"""`cifar-rounds run round-1`: the founding analysis's rounds as named DVC experiments.

A round's values live in `rounds/<name>.yaml` (a partial params.yaml, validated
by `Params`). Every value of the preset is passed with -S, because `dvc exp run
-S` in the workspace keeps earlier changes to params.yaml: a round is fully
defined by its preset plus the overrides given here, never by what ran before.
Replicates (`--seeds N`) differ only in `train.seed` and are named NAME-s0 ... NAME-s{N-1};
`--workers K` runs K at once, each in a clone of the repository (analysis/clones.py), and saves
each here as it finishes. `--queue` hands them to DVC's own queue, as `dvc exp run --queue` does.

A rerun continues: an experiment already saved on this commit with the same values
is skipped (said so), so `--seeds 3` after `--seeds 2` runs NAME-s2 only; `--force`
retrains. Ctrl-C or SIGTERM is passed on to DVC and its stage, which end their runs,
and params.yaml is put back before `rounds run` exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifar_rounds.analysis.clones import run_in_clones
from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.inputs import read_text
from cifar_rounds.core.interrupts import Interrupts, interrupts_caught
from cifar_rounds.core.params import PARAMS_FILE, Params, ParamsError, load_params, params_from_text, with_overrides
from cifar_rounds.core.yamlio import flatten, read_yaml

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


def round_values(preset: str, name: str, sets: list[str], epochs: int | None, seeds: int | None) -> dict[str, object]:
    """The preset, the round's name and planned seeds, `--epochs` with its scaled milestones, then the -S
    overrides; validated."""
    values: dict[str, object] = {
        **load_preset(preset),
        "tracking.round": name,
        "tracking.preset": preset,
        "tracking.planned_seeds": seeds,
    }
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
    for key, value in values.items():  # and values DVC would not read as typed
        override_value(key, value)
    return values


def replicates(name: str, values: dict[str, object], seeds: int | None) -> list[tuple[str, dict[str, object]]]:
    """(experiment name, values) per run: one run (seed 0 unless -S sets it), or `seeds` replicates (0..seeds-1).

    The seed is always set: a workspace run would otherwise inherit the last replicate's.
    """
    if seeds is None:
        return [(name, {"train.seed": 0, **values})]
    return [(f"{name}-s{seed}", {**values, "train.seed": seed}) for seed in range(seeds)]


def override_value(key: str, value: object) -> str:
    """`value` as DVC's -S parser (Hydra's override grammar) reads it back as typed: JSON, with other than ASCII
    written as it is (Hydra does not read JSON's \\u escapes). Hydra keeps JSON's escape of a backslash or a control
    character as two characters and resolves `${...}`, so a string holding one has no such form: refused by key."""
    text = json.dumps(value, ensure_ascii=False)
    strings = value if isinstance(value, list) else [value]
    if any(isinstance(s, str) and ("\\" in s or "${" in s or not s.isprintable()) for s in strings):
        raise StageError(f"{key}: {text[:40]}: a backslash, '${{' or a control character cannot be set here")
    return text


def exp_run_command(name: str, values: dict[str, object], mode: list[str]) -> list[str]:
    sets = [f"{key}={override_value(key, value)}" for key, value in values.items()]
    return [sys.executable, "-m", "dvc", "exp", "run", "-n", name, *mode, *(a for s in sets for a in ("-S", s))]


def saved_experiments(root: Path) -> dict[str, Params | None]:
    """The params of each DVC experiment saved on this commit (DVC saves a run once it has finished);
    None where they cannot be read or do not validate under this code."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.experiments.ls()
        return {
            name: saved_params(repo.scm.get_fs(sha), name)
            for names in found.values()
            for name, sha in names
            if name and sha
        }


def saved_params(fs, name: str) -> Params | None:
    try:
        return params_from_text(fs.read_text(str(PARAMS_FILE)), Path(f"{name}:{PARAMS_FILE}"))
    except (FileNotFoundError, UnicodeDecodeError, ParamsError):
        return None


def changed_fields(wanted: Params, saved: Params) -> list[str]:
    """Fields whose values differ; not the planned seeds, which a later, larger --seeds raises."""
    a, b = wanted.flat(), saved.flat()
    return sorted(k for k in a if a[k] != b.get(k) and k != "tracking.planned_seeds")


def runs_to_do(
    runs: list[tuple[str, dict[str, object]]], saved: dict[str, Params | None], base: Params
) -> list[tuple[str, dict[str, object]]]:
    """The runs not saved yet; a saved one with the same values is skipped (said so), one with others refused."""
    todo = []
    for name, values in runs:
        if name not in saved:
            todo.append((name, values))
            continue
        old = saved[name]
        changed = changed_fields(with_overrides(base, values), old) if old is not None else ["params.yaml"]
        if changed:
            raise StageError(
                f"{name}: a finished experiment of this name ran other values ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}); add --force to replace it, or -n to name this round"
            )
        print(f"{name}: finished (a DVC experiment on this commit with these values); skipped (--force retrains)")
    return todo


def run_experiment(name: str, values: dict[str, object], mode: list[str], interrupts: Interrupts) -> None:
    """`dvc exp run` to its end; raises if it failed or was interrupted."""
    code = interrupts.exit_code(exp_run_command(name, values, mode))
    interrupts.stop_if_any(f"{name} (params.yaml is as it was)")
    if code != 0:  # DVC has said why
        raise StageError(f"dvc exp run failed for {name} (exit {code}); params.yaml is as it was")


def run_all(runs: list[tuple[str, dict[str, object]]], mode: list[str], interrupts: Interrupts) -> None:
    """Each run in turn. On a failure or an interrupt params.yaml is put back byte for byte as it was before the
    first (DVC rewrites it for each), once DVC has ended; the signal handlers only record, so nothing cuts that
    write short."""
    before = PARAMS_FILE.read_bytes()
    try:
        for name, values in runs:
            interrupts.stop_if_any(f"{name} (params.yaml is as it was)")
            run_experiment(name, values, mode, interrupts)
    except BaseException:
        with atomic_path(PARAMS_FILE) as tmp:
            tmp.write_bytes(before)
        raise


def run_preset(args: argparse.Namespace) -> None:
    name = args.preset if args.name is None else args.name  # an empty -n is refused, not the preset's
    values = round_values(args.preset, name, args.set + args.overrides, args.epochs, args.seeds)
    mode = ["--queue"] * args.queue + ["--temp"] * args.temp + ["--force"] * args.force
    with interrupts_caught() as interrupts:
        runs = replicates(name, values, args.seeds)
        if not args.force:
            runs = runs_to_do(runs, saved_experiments(Path.cwd()), load_params())
        if args.workers is None:
            run_all(runs, mode, interrupts)
        else:  # side by side, each in a clone: this workspace's params.yaml is not touched
            run_in_clones([(n, exp_run_command(n, v, mode)) for n, v in runs], args.workers, interrupts)
    if args.queue and runs:
        print("queued in DVC's own queue; start it with: dvc queue start (and watch: dvc queue status)")


def show_preset(args: argparse.Namespace) -> None:
    print(json.dumps(load_preset(args.preset), indent=2))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
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
    run.add_argument(
        "-n", "--name", help="the round's name: of its experiments and its MLflow `round` tag (default: the preset's)"
    )
    run.add_argument("-f", "--force", action="store_true", help="replace an experiment of the same name")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        metavar="K",
        help="run K experiments at once, each in its own clone of the repository, saved here as they finish",
    )
    where.add_argument("--queue", action="store_true", help="queue them in DVC's own queue (then: dvc queue start)")
    where.add_argument("--temp", action="store_true", help="run in a temporary copy; the workspace stays as it is")
    show = sub.add_parser("show", help="print a preset's values")
    show.add_argument("preset", help="a preset name")
    show.set_defaults(handler=show_preset)
    args = parser.parse_args(argv)
    if getattr(args, "seeds", None) is not None and args.seeds < 1:
        parser.error("--seeds: at least 1")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        parser.error("--workers: at least 1")
    args.handler(args)


if __name__ == "__main__":
    run_stage(main)
