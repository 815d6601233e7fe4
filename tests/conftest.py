"""Fixtures, the CPU's setup, and the markers each test folder implies (helpers.py holds the shared functions)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from cifar_rounds.data.synthetic import write_archive

from helpers import tracking_server


def pytest_configure(config) -> None:
    """The CPU set up as the stages set it up, before the first parallel operation starts the thread pool.

    Under pytest-xdist each worker, and every process its tests start, gets one thread: two
    workers of two threads each on two cores spin against each other and run many times slower
    (benchmarks/concurrent_trials.py).
    """
    from cifar_rounds.training.runtime import configure_cpu

    configure_cpu(torch.device("cpu"))
    # Ctrl-C at its default, as a terminal starts a command, even when the suite runs as a background job
    # (which ignores it, and so would every process the tests start: the tests that press Ctrl-C need it)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive") / "cifar-10-synthetic.tar.gz"
    return path, write_archive(path, train_size=1500, test_size=400, seed=1)


@pytest.fixture
def mlflow_server(tmp_path):
    with tracking_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as url:
        yield url


FOLDER_MARKS = {"e2e": "slow", "gpu": "gpu"}  # a test's folder says what it needs
TESTS = Path(__file__).parent
# The files that take longest, longest first (their tests' summed times, 2026-12-07: benchmarks/RESULTS.md). Each
# file runs on one worker (`--dist loadfile`), in this order (`--no-loadscope-reorder`), the others after them: the
# short files then fill the end of the run, where one long file starting last kept one worker busy and the
# other idle (xdist's own order puts the files with the most tests first).
LONGEST_FIRST = (
    "e2e/test_rounds.py",
    "e2e/test_recovery.py",
    "e2e/test_readme.py",
    "e2e/test_record.py",
    "e2e/test_shared_store.py",
    "e2e/test_sweep_workers.py",
    "e2e/test_round_runs.py",
    "e2e/test_store_outage.py",
    "e2e/test_pipeline.py",
    "e2e/test_distributed.py",
    "e2e/test_tracking.py",
    "e2e/test_reliability.py",
    "e2e/test_gpu_script.py",
    "e2e/test_team.py",
    "e2e/test_sweep_trials.py",
)


def file_rank(item: pytest.Item) -> int:
    """Where the item's file comes in LONGEST_FIRST; after all of them if it is not there."""
    name = item.path.relative_to(TESTS).as_posix()
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        mark = FOLDER_MARKS.get(item.path.parent.name)
        if mark:
            item.add_marker(mark)
    items.sort(key=file_rank)  # stable: each file's tests, and the files not listed, keep their order
