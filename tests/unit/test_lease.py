"""Leases of a machine's devices: real processes holding real locks, with a device count given as an argument."""

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cifar_rounds.core.errors import StageError
from cifar_rounds.training.lease import (
    LEASE_DIR_ENV,
    SLOTS_ENV,
    TRAININGS_ENV,
    cpu_holders,
    cpu_threads,
    lease_cpu,
    lease_folder,
    needs_lease,
    slots_per_gpu,
    training_place,
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


@pytest.mark.parametrize("value", ["²", "1025", "30000000", "9" * 5000])
@pytest.mark.parametrize("variable, count", [(SLOTS_ENV, slots_per_gpu), (TRAININGS_ENV, trainings_cap)])
def test_a_count_that_is_not_ascii_digits_or_past_the_bound_is_one_line_naming_the_variable(
    monkeypatch, variable, count, value
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(StageError, match=f"^{variable}: expected a whole number .*, 1 to 1024") as error:
        count()
    assert len(str(error.value)) < 200
    monkeypatch.setenv(variable, "1024")  # the bound itself is a count
    assert count() == 1024


def test_a_project_of_many_training_places_makes_only_the_lock_files_it_tries(tmp_path):
    started = time.monotonic()
    training_place(1_000_000, "/repo/a", tmp_path).close()
    assert time.monotonic() - started < 0.5  # all million paths made first took seconds and 300 MB
    assert len(list(tmp_path.iterdir())) == 1


def _folder_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile" / "leases"


def _lock_path_a_folder(tmp_path: Path) -> Path:
    (tmp_path / "cpu0.lock").mkdir()
    return tmp_path


def _lock_path_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    (tmp_path / "cpu0.lock").symlink_to(tmp_path / "afile" / "x")
    return tmp_path


def _folder_not_writable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes in any folder")
    tmp_path.chmod(0o500)
    return tmp_path


@pytest.mark.parametrize(
    "unusable", [_folder_under_a_file, _lock_path_a_folder, _lock_path_under_a_file, _folder_not_writable]
)
def test_an_unusable_lease_folder_or_lock_path_is_one_line_naming_it_and_the_variable(monkeypatch, tmp_path, unusable):
    monkeypatch.setenv(LEASE_DIR_ENV, str(unusable(tmp_path)))
    try:
        with pytest.raises(StageError, match=LEASE_DIR_ENV) as error:
            lease_cpu(lease_folder())
    finally:
        tmp_path.chmod(0o700)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def default_folder(monkeypatch, tmp_path) -> Path:
    """Where the default lease folder goes, with this test's folder as the machine's temp folder."""
    monkeypatch.delenv(LEASE_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"cifar-rounds-leases-{os.geteuid()}"


def test_the_default_lease_folder_is_made_private_to_its_user(default_folder):
    assert lease_folder() == default_folder
    assert stat.S_IMODE(default_folder.stat().st_mode) == 0o700


def _writable_by_others(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o777)


def _owned_by_another_user(folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, -1)


def _a_link_to_a_folder(folder: Path) -> None:
    (folder.parent / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(folder.parent / "elsewhere")


@pytest.mark.parametrize("made_first", [_writable_by_others, _owned_by_another_user, _a_link_to_a_folder])
def test_a_default_lease_folder_another_user_could_use_is_refused_in_one_line(default_folder, made_first):
    made_first(default_folder)
    with pytest.raises(StageError, match=f"^{default_folder}: the default lease folder is .*{LEASE_DIR_ENV}") as e:
        lease_folder()
    assert "\n" not in str(e.value)
