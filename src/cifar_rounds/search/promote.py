"""`--promote NAME`: a sweep's best trial as the preset rounds/NAME.yaml, the next round to replicate.

Only the searched values go onto the baseline preset. The sweep's fixed values (a
shortened schedule, say) made the trials comparable with each other; carried over,
the next round would differ from its baseline in the schedule as well. The target is
checked before the sweep runs: a plain preset name inside the presets folder, and no
existing preset unless `--force`, which keeps the old file as a dated backup.
"""

from __future__ import annotations

import re
import shutil
import time
from itertools import count
from pathlib import Path

from cifar_rounds.analysis.rounds import PRESETS_DIR, load_preset
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.files import atomic_path
from cifar_rounds.core.params import ROUND_NAME_PATTERN, ParamsError, with_overrides
from cifar_rounds.core.yamlio import unflatten, write_yaml
from cifar_rounds.search.study import Driver, counts


def preset_target(name: str, force: bool, folder: Path = PRESETS_DIR) -> Path:
    """The file `--promote NAME` writes, refused in one line unless it is a new preset (or `force`)."""
    if not re.fullmatch(ROUND_NAME_PATTERN, name):  # the preset's name is its round's by default
        raise StageError(
            f"--promote {name!r}: not a preset name (ASCII letters, digits, '_' and '-', as a round's name); "
            f"the preset is written as {folder}/NAME.yaml"
        )
    if not folder.is_dir():
        raise StageError(f"--promote: no {folder}/ folder here; run from the repository root")
    path = folder / f"{name}.yaml"
    if path.resolve().parent != folder.resolve():
        raise StageError(f"--promote {name}: {path} leads outside {folder}/ (a link); choose another name")
    if path.exists() and not force:
        raise StageError(
            f"--promote {name}: {path} exists; choose another name, or add --force to replace it "
            "(the old file is kept as a backup)"
        )
    return path


def backup_path(path: Path) -> Path:
    """A new file beside `path`, named by the time, that no preset listing takes for a preset."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = (f"{path.name}.{stamp}{f'-{n}' if n else ''}.bak" for n in count())
    return next(p for p in (path.with_name(n) for n in names) if not p.exists())


def listed(values: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items()) or "none"


def best_complete_trial(d: Driver):
    """The study's best COMPLETE trial; one line when there is none."""
    if not counts(d.study).get("COMPLETE"):
        found = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts(d.study).items())) or "no trials"
        raise StageError(f"--promote: no trial of study {d.sweep.study!r} has completed ({found}); nothing promoted")
    return d.study.best_trial


def promote(d: Driver, name: str, force: bool, folder: Path = PRESETS_DIR) -> Path:
    """Write the best trial's searched values onto the baseline preset as folder/NAME.yaml."""
    path = preset_target(name, force, folder)
    best = best_complete_trial(d)
    searched = {k: d.sweep.decoded(best.params)[k] for k in d.sweep.space}  # in the sweep file's order
    values = {**load_preset(d.sweep.baseline, folder), **d.sweep.fixed, **searched}
    try:
        with_overrides(d.base, values)
    except ParamsError as error:
        raise StageError(
            f"--promote: trial {best.number}'s values on {d.sweep.baseline} are not valid params ({error})"
        ) from None
    header = (
        f"Round {name}: the best trial of sweep {d.sweep.study!r} (trial {best.number}, {d.sweep.objective.metric} "
        f"{best.value:.4f}, one seed, on validation images) on its baseline {d.sweep.baseline}.\n"
        f"From the sweep: {', '.join(f'{k}={v!r}' for k, v in searched.items())}.\n"
        f"Kept from the sweep's fixed values: {listed(d.sweep.fixed)}; not kept, the trials' shortened "
        f"schedule: {listed(d.sweep.schedule)}. Everything else is {folder}/{d.sweep.baseline}.yaml's.\n"
        "A hypothesis until its replicates beat the champion's round in the round report on fresh seeds."
    )
    backup = None
    if path.exists():
        backup = backup_path(path)
        shutil.copy2(path, backup)
    with atomic_path(path) as tmp:
        write_yaml(unflatten(values), tmp, header)
    kept = f" (the previous {path.name} is kept as {backup})" if backup else ""
    print(
        f"sweep: promoted trial {best.number} to {path}{kept}; next: a pilot, cifar-rounds run {name} --seeds 2, "
        "then the round report against the champion's round advises the seeds to plan (--seeds N)"
    )
    return path
