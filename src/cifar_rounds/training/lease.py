"""A machine's devices shared by the trainings that run on it at once: a GPU slot each, the CPU cores split.

Sweep and replicate workers (`sweep --workers N`, `rounds run --workers N`) start trainings that know
nothing of each other. Each training that is not pinned (CUDA_VISIBLE_DEVICES) and not under
torchrun leases a slot: a lock file per device and slot in one folder that every process of the
machine sees. The lock is the kernel's (flock): it dies with its process, so a kill frees the slot.
Slots are taken one per GPU before any GPU gets a second, so K trainings on G GPUs spread out.
A training on the CPU leases a CPU place instead, and at its start and at every epoch boundary
sets torch's threads to its share of the cores: the cores divided by the CPU trainings holding a
place. Several trainings with a thread per core each oversubscribe the cores and spin against
each other (18x slower in total on 2 cores, benchmarks/RESULTS.md).

A sweep, or replicates run side by side, cap the project's trainings at their workers (TRAININGS_ENV):
a training started beside them (a DVC queue's) waits for a place rather than slowing theirs.

Placement is not the model: the slots per GPU come from the environment (SLOTS_ENV), never from
params.yaml, and the lease folder from LEASE_DIR_ENV (default: one per user in the temp folder,
private to that user: another who could write there could hold every place).
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cifar_rounds.core.errors import StageError, short_repr
from cifar_rounds.core.names import TRAININGS_ENV  # the project's trainings that train at once (unset: no cap)
from cifar_rounds.tracking.store import repo_root

SLOTS_ENV = "CIFAR_ROUNDS_SLOTS_PER_GPU"  # trainings one GPU runs at once (default 1)
LEASE_DIR_ENV = "CIFAR_ROUNDS_LEASE_DIR"  # the machine's lease folder
POLL_S = 2.0  # how often a training waiting for a GPU slot or a training place looks again, seconds
# the most slots per GPU, or trainings at once: a waiting training tries each place's lock file every POLL_S, and
# no machine trains a thousand models at once, so a larger count is a typo (30000000), not a plan
MAX_PLACES = 1024


@dataclass
class Lease:
    """A held place: a GPU's slot, or a place among the CPU trainings; held until the process ends."""

    device: str  # "cuda" or "cpu"
    index: int  # the GPU's index; for the CPU, the place's number
    slot: int  # the GPU's slot (0 for the CPU)
    slots: int  # slots per GPU (1 for the CPU)
    folder: Path
    handle: IO  # the locked file: closing it (or the process ending) frees the place
    place: IO | None = None  # the project's training place, where its trainings are capped

    def conditions(self) -> dict[str, str]:
        """The placement as run conditions (tags, summary, report): which device, shared how."""
        if self.device == "cuda":
            return {"device_index": str(self.index), "device_slots": f"slot {self.slot + 1} of {self.slots}"}
        return {"device_index": "cpu", "device_slots": f"{cpu_holders(self.folder)} CPU training(s) at start"}

    def release(self) -> None:
        self.handle.close()
        if self.place is not None:
            self.place.close()


def lease_folder() -> Path:
    """The machine's lease folder: LEASE_DIR_ENV's where set, else this user's private one in the temp folder."""
    chosen = os.environ.get(LEASE_DIR_ENV)
    folder = Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"cifar-rounds-leases-{os.geteuid()}"
    try:
        # the default sits in the temp folder every user shares: private, so that no one else holds its places
        folder.mkdir(mode=0o777 if chosen else 0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise StageError(f"{LEASE_DIR_ENV}: cannot use {folder} as the lease folder ({error.strerror})") from None
    if not chosen and (why := why_not_private(folder)) is not None:
        raise StageError(
            f"{folder}: the default lease folder is {why}, so another user could hold every place; "
            f"set {LEASE_DIR_ENV} to a folder of your own"
        )
    return folder


def why_not_private(folder: Path) -> str | None:
    """Why `folder` is not this user's alone (a link, another owner, others may write in it); None when it is."""
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return "a link, not a folder"
    if info.st_uid != os.geteuid():
        return f"owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def place_count(variable: str, text: str, what: str) -> int:
    """`text`, the value of `variable`, as a count of places from 1 to MAX_PLACES; else a one-line StageError."""
    # ASCII digits only: str.isdigit() takes '²', which int() refuses; and no more digits than MAX_PLACES has, as
    # int() refuses over 4,300 of them
    digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_PLACES))
    if not digits or not 1 <= int(text) <= MAX_PLACES:
        raise StageError(f"{variable}: expected a whole number of {what}, 1 to {MAX_PLACES} (got {short_repr(text)})")
    return int(text)


def slots_per_gpu() -> int:
    return place_count(SLOTS_ENV, os.environ.get(SLOTS_ENV, "1"), "trainings per GPU")


def trainings_cap() -> int | None:
    """The project's trainings allowed at once (a sweep sets it for its workers' trainings); None: no cap."""
    text = os.environ.get(TRAININGS_ENV)
    return None if text is None else place_count(TRAININGS_ENV, text, "trainings at once")


def _locked(path: Path) -> IO | None:
    """The file, locked by this process; None when another process holds it."""
    try:
        handle = open(path, "a")
    except OSError as error:  # a folder or a link where the lock file goes, a lease folder this user cannot write
        raise StageError(
            f"{path}: cannot open it as a lock file ({error.strerror}); make the lease folder writable "
            f"or set {LEASE_DIR_ENV} to another folder"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def first_free(
    places: int, path_of: Callable[[int], Path], held_line: str, say: Callable[[str], None]
) -> tuple[int, IO]:
    """The first of `places` places this process locks (place i's lock file is `path_of(i)`, made as it is
    tried), and its locked file; while all are held, waits, saying `held_line` once."""
    said = False
    while True:
        for position in range(places):
            if (handle := _locked(path_of(position))) is not None:
                return position, handle
        if not said:
            say(held_line)
            said = True
        time.sleep(POLL_S)


def lease_gpu(devices: int, slots: int, folder: Path, say: Callable[[str], None] = print) -> Lease:
    """The first free slot, taking slot 0 of every GPU before slot 1 of any; waits while all are held."""

    def path_of(position: int) -> Path:  # slot 0 of GPUs 0, 1, ..., then slot 1 of each, ...
        return folder / f"cuda{position % devices}.slot{position // devices}.lock"

    held = f"train: all {devices} GPU(s) x {slots} slot(s) are held by other trainings; waiting for one "
    position, handle = first_free(devices * slots, path_of, held + f"(slots per GPU: {SLOTS_ENV})", say)
    return Lease("cuda", position % devices, position // devices, slots, folder, handle)


def training_place(cap: int, project: str, folder: Path, say: Callable[[str], None] = print) -> IO:
    """One of the project's `cap` training places, held until the process ends; waits while all are held."""
    tag = zlib.crc32(project.encode())  # one set of places per project: other projects are not capped by it
    held = f"train: the project's {cap} training place(s) are held ({TRAININGS_ENV}); waiting for one"
    return first_free(cap, lambda index: folder / f"training-{tag:08x}.{index}.lock", held, say)[1]


def lease_cpu(folder: Path) -> Lease:
    """A place among the machine's CPU trainings (as many as there are)."""
    index = 0
    while (handle := _locked(folder / f"cpu{index}.lock")) is None:
        index += 1
    return Lease("cpu", index, 0, 1, folder, handle)


def cpu_holders(folder: Path) -> int:
    """CPU trainings holding a place now, this one included (a held lock cannot be taken again)."""
    held = 0
    for path in folder.glob("cpu*.lock"):
        handle = _locked(path)
        if handle is None:
            held += 1
        else:
            handle.close()
    return held


def cpu_threads(folder: Path, cores: int) -> int:
    """This training's share of the cores: the cores divided by the CPU trainings holding a place."""
    return max(1, cores // max(1, cpu_holders(folder)))


def needs_lease(env: dict[str, str]) -> bool:
    """Not under torchrun (its ranks are placed by LOCAL_RANK) and not pinned to a GPU by the user."""
    return "LOCAL_RANK" not in env and "CUDA_VISIBLE_DEVICES" not in env


def take_lease(use_cuda: bool, gpus: int) -> Lease | None:
    """This training's place on the machine, or None where it is placed already (pinned, or torchrun)."""
    if not needs_lease(dict(os.environ)):
        return None
    folder, cap = lease_folder(), trainings_cap()
    place = None if cap is None else training_place(cap, str(repo_root()), folder)
    lease = lease_gpu(gpus, slots_per_gpu(), folder) if use_cuda else lease_cpu(folder)
    lease.place = place
    return lease


def share_cores(lease: Lease | None) -> None:
    """Set torch's threads to this CPU training's share of the cores; a thread count the user set is kept."""
    import torch

    if lease is not None and lease.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(lease.folder, len(os.sched_getaffinity(0))))
