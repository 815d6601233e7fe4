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


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        mark = FOLDER_MARKS.get(item.path.parent.name)
        if mark:
            item.add_marker(mark)
