"""Ctrl-C and SIGTERM while a command waits on a child that must end its own work first (DVC and its stage).

The child runs in its own process group, so a terminal's Ctrl-C reaches it once, through
here; the handlers only record and pass on, so nothing the parent does afterwards (putting a
file back) is cut short, and the parent decides where to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Interrupts:
    """Signals received: remembered, and passed on as Ctrl-C to the running child's process group, which is
    then waited for."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.child: subprocess.Popen | None = None
        self.passed_on = 0

    def receive(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        self.pass_on()

    def pass_on(self) -> None:
        """Each signal once to the child's group, while it runs."""
        while self.child is not None and self.child.poll() is None and self.passed_on < len(self.signals):
            self.passed_on += 1
            try:
                os.killpg(self.child.pid, signal.SIGINT)
            except ProcessLookupError:  # it has just ended
                return

    def pass_on_to_all(self, procs: list[subprocess.Popen], signum: int) -> None:
        """Each signal received since the last call, as `signum`, once to the process group of each of `procs`
        still running (children started side by side, each in its own group)."""
        while self.passed_on < len(self.signals):
            self.passed_on += 1
            for proc in procs:
                if proc.poll() is None:
                    with suppress(ProcessLookupError):  # it has just ended
                        os.killpg(proc.pid, signum)

    def exit_code(self, command: list[str]) -> int:
        """Run `command` to its end in its own process group (a terminal's Ctrl-C reaches it through here, once)."""
        self.child = subprocess.Popen(command, process_group=0)
        try:
            self.pass_on()  # a signal that came while it started
            return self.child.wait()
        finally:
            self.child = None

    def stop_if_any(self, where: str) -> None:
        """Raise KeyboardInterrupt naming the first signal and `where` it stopped, if one came."""
        if self.signals:
            raise KeyboardInterrupt(f"signal {self.signals[0]} at {where}")


def not_for_this_process(signum: int, frame: object) -> None:
    """Ctrl-C where it was ignored: still ignored here, but no longer inherited as ignored by the children."""


@contextmanager
def interrupts_caught() -> Iterator[Interrupts]:
    """Ctrl-C and SIGTERM go to an `Interrupts` for the block.

    Ctrl-C ignored (a background job, `nohup ... &`) stays ignored by this process; it is handled by a
    function that does nothing instead, because an ignored signal stays ignored across exec and a
    handled one does not: the children, which this process stops with Ctrl-C, must not ignore it.
    """
    interrupts = Interrupts()
    handlers = {signal.SIGTERM: interrupts.receive}
    ctrl_c = signal.getsignal(signal.SIGINT)
    if ctrl_c is signal.default_int_handler:
        handlers[signal.SIGINT] = interrupts.receive
    elif ctrl_c == signal.SIG_IGN:
        handlers[signal.SIGINT] = not_for_this_process
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
