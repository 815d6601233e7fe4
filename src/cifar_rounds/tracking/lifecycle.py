"""What surrounds a run: the machine's system metrics sampled into it, and its end on any exit.

FINISHED when the block ends, FAILED on an exception, KILLED on Ctrl-C or SIGTERM; a signal that
arrives during a store write waits for the write's end (`Tracker.writing`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mlflow.entities import RunStatus

from cifar_rounds.core.errors import StageError

if TYPE_CHECKING:
    from cifar_rounds.tracking.run import NullTracker, Tracker


@contextmanager
def system_metrics(uri: str, run_id: str | None, interval_s: float, node: str | None = None) -> Iterator[None]:
    """MLflow's own system metrics of this machine, sampled into `run_id` every `interval_s` while the block runs.

    `node` names the machine in the metric keys (`system/NODE/...`), so that the nodes of a
    torchrun job stay apart in one run. A resumed run continues their steps. 0 or no run: off.
    """
    if interval_s == 0 or run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node, tracking_uri=uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextmanager
def terminated_on_exit(tracker: Tracker | NullTracker) -> Iterator[None]:
    """End the run FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.

    Ctrl-C (unless ignored, as in background jobs) and SIGTERM raise KeyboardInterrupt at once,
    or, during a store write, when the write is done. Where the store itself failed, the run's
    status is set by the next run of the stage (which resumes it, or ends it as superseded).
    """

    def interrupt(signum, frame) -> None:
        if tracker.writing:
            tracker.pending_signal = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    handled = [signal.SIGTERM] + (
        [signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []
    )
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    try:
        yield
    except KeyboardInterrupt:
        _finish_quietly(tracker, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        _finish_quietly(tracker, RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        tracker.finish(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _finish_quietly(tracker: Tracker | NullTracker, status: str) -> None:
    """Mark the run; if the store is what failed, leave that error as the one reported."""
    try:
        tracker.finish(status)
    except StageError:
        pass
