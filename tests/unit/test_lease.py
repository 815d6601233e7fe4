"""Leases of a machine's devices: real processes holding real locks, with a device count given as an argument."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_rounds.core.errors import StageError
from cifar_rounds.training.lease import (
    SLOTS_ENV,
    TRAININGS_ENV,
    cpu_holders,
    cpu_threads,
    lease_cpu,
    needs_lease,
    slots_per_gpu,
    trainings_cap,
)

from helpers import env

# A holder: leases a GPU slot (or a CPU place), prints where, and keeps it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from cifar_rounds.training.lease import lease_cpu, lease_gpu, training_place
folder, kind, devices, slots = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
say = lambda line: print("WAIT " + line, flush=True)
if kind == "place":  # one of a project's `devices` training places; the project is the fifth argument
    handle = training_place(devices, sys.argv[5], folder, say=say)
    print(f"HELD {handle.name.rsplit('.', 2)[-2]} 0", flush=True)
else:
    lease = lease_gpu(devices, slots, folder, say=say) if kind == "gpu" else lease_cpu(folder)
    print(f"HELD {lease.index} {lease.slot}", flush=True)
time.sleep(600)
"""


class Holders:
    """Holder processes this test starts, each in its own process group; all ended at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.procs = folder, []

    def start(self, kind: str = "gpu", devices: int = 1, slots: int = 1, project: str = "") -> subprocess.Popen:
        cmd = [sys.executable, "-c", HOLDER, str(self.folder), kind, str(devices), str(slots), project]
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def end(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def holders(tmp_path):
    h = Holders(tmp_path)
    yield h
    h.end()


def held(proc: subprocess.Popen) -> tuple[int, int]:
    """The (device, slot) a holder reports, after any WAIT line."""
    while True:
        line = proc.stdout.readline()
        assert line, "the holder ended without a lease"
        if line.startswith("HELD"):
            return tuple(int(w) for w in line.split()[1:])


def test_k_trainings_on_g_gpus_of_s_slots_share_no_slot_and_spread_before_doubling(holders):
    places = [held(holders.start(devices=3, slots=2)) for _ in range(6)]
    assert sorted(places) == [(d, s) for d in range(3) for s in range(2)]  # no slot shared beyond its one holder
    assert places[:3] == [(0, 0), (1, 0), (2, 0)]  # every GPU gets one before any gets two


def test_a_training_waits_with_one_line_and_a_killed_holder_frees_its_slot(holders):
    first = holders.start(devices=1, slots=1)
    assert held(first) == (0, 0)
    waiting = holders.start(devices=1, slots=1)
    line = waiting.stdout.readline()
    assert line.startswith("WAIT train: all 1 GPU(s) x 1 slot(s) are held") and SLOTS_ENV in line
    os.killpg(first.pid, signal.SIGKILL)  # the lock dies with its process
    first.wait()
    assert held(waiting) == (0, 0)


def test_a_projects_trainings_are_capped_and_a_spare_waits_for_a_place_that_a_kill_frees(holders):
    first, second = (holders.start(kind="place", devices=2, project="/repo/a") for _ in range(2))
    first_place, second_place = held(first)[0], held(second)[0]
    assert {first_place, second_place} == {0, 1}
    spare = holders.start(kind="place", devices=2, project="/repo/a")
    line = spare.stdout.readline()
    assert line.startswith("WAIT train: the project's 2 training place(s) are held") and TRAININGS_ENV in line
    assert held(holders.start(kind="place", devices=2, project="/repo/b")) == (0, 0)  # other projects: not capped
    os.killpg(first.pid, signal.SIGKILL)  # the place dies with its process
    first.wait()
    assert held(spare)[0] == first_place


def test_a_bad_trainings_cap_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(TRAININGS_ENV, "0")
    with pytest.raises(StageError, match=TRAININGS_ENV):
        trainings_cap()
    monkeypatch.delenv(TRAININGS_ENV)
    assert trainings_cap() is None


def test_cpu_trainings_each_get_their_share_of_the_cores(holders, tmp_path):
    own = lease_cpu(tmp_path)
    assert cpu_holders(tmp_path) == 1 and cpu_threads(tmp_path, 6) == 6
    others = [holders.start(kind="cpu") for _ in range(2)]
    assert sorted(held(p)[0] for p in others) == [1, 2]
    assert cpu_holders(tmp_path) == 3 and cpu_threads(tmp_path, 6) == 2 and cpu_threads(tmp_path, 2) == 1
    os.killpg(others[0].pid, signal.SIGKILL)
    others[0].wait()
    deadline = time.time() + 10
    while cpu_holders(tmp_path) != 2:
        assert time.time() < deadline
        time.sleep(0.1)
    assert cpu_threads(tmp_path, 6) == 3
    own.release()
    assert cpu_holders(tmp_path) == 1


def test_pinned_and_torchrun_trainings_do_not_lease():
    assert needs_lease({})
    assert not needs_lease({"CUDA_VISIBLE_DEVICES": "3"})
    assert not needs_lease({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_bad_slots_per_gpu_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(SLOTS_ENV, value)
    with pytest.raises(StageError, match=f"{SLOTS_ENV}: expected a whole number"):
        slots_per_gpu()
