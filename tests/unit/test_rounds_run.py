"""`rounds run`: what it names and records, which replicates a rerun runs, and how an interrupt reaches DVC."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cifar_rounds.analysis.rounds import replicates, round_values, runs_to_do
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import with_overrides

from helpers import REPO, env, repo_params


def test_the_round_is_the_name_the_runs_get_and_the_preset_and_planned_seeds_are_recorded(monkeypatch):
    monkeypatch.chdir(REPO)
    values = round_values("round-1", "round-3", ["train.patience=7"], None, 3)
    assert values["tracking.round"] == "round-3" and values["tracking.preset"] == "round-1"
    assert values["tracking.planned_seeds"] == 3 and values["train.patience"] == 7
    assert values["train.learning_rate"] == 0.01  # the preset's
    assert [name for name, _ in replicates("round-3", values, 3)] == ["round-3-s0", "round-3-s1", "round-3-s2"]
    single = round_values("round-2", "round-2", [], None, None)
    assert single["tracking.round"] == "round-2" and single["tracking.planned_seeds"] is None


def test_a_rerun_skips_what_finished_with_the_same_values_and_refuses_other_values(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    base = repo_params()
    two, three = (replicates("round-1", round_values("round-1", "round-1", [], 2, n), n) for n in (2, 3))
    saved = {name: with_overrides(base, values) for name, values in two}  # `--seeds 2` ran to the end
    assert [name for name, _ in runs_to_do(three, saved, base)] == ["round-1-s2"]  # only the new seed
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "round-1-s0: finished" in out and "--force retrains" in out
    assert runs_to_do(three, {}, base) == three  # nothing saved: all of them
    assert runs_to_do(three, {"round-1-s0": saved["round-1-s0"]}, base) == three[1:]  # s1 was interrupted
    longer = replicates("round-1", round_values("round-1", "round-1", [], 3, 3), 3)
    with pytest.raises(StageError, match=r"round-1-s0: a finished experiment .*train.num_epochs.*add --force"):
        runs_to_do(longer, saved, base)
    with pytest.raises(StageError, match=r"round-1-s0: .*\(params.yaml\); add --force"):
        runs_to_do(three, {"round-1-s0": None}, base)  # saved by a version whose params do not validate here


PARENT = """
import sys
from cifar_rounds.core.interrupts import interrupts_caught

with interrupts_caught() as interrupts:
    code = interrupts.exit_code([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(code, interrupts.signals, flush=True)
interrupts.stop_if_any("child")
"""
# counts the Ctrl-Cs it gets, takes a while to end after the first (as a stage ending its run does)
CHILD = textwrap.dedent(
    """
    import signal, sys, time
    got = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    print("ready", flush=True)
    deadline = time.monotonic() + 120  # never reached: it ends by itself if the test failed
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    open(sys.argv[1], "w").write(str(len(got)))
    sys.exit(3)
    """
)


@contextmanager
def parent_of_a_ready_child(parent_code: str, child_code: str, out: Path) -> Iterator[subprocess.Popen]:
    """`parent_code` run in its own session with `child_code` and `out` as arguments, once its child says "ready";
    killed with its group afterwards if still running."""
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, child_code, str(out)],
        env=env(PYTHONPATH=str(REPO / "src")),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        yield parent
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


@pytest.mark.parametrize("how", ["ctrl-c to the group", "sigterm to the process"])
def test_an_interrupt_reaches_the_child_once_and_the_child_is_waited_for(tmp_path, how):
    count = tmp_path / "count"
    with parent_of_a_ready_child(PARENT, CHILD, count) as parent:
        if how == "ctrl-c to the group":
            os.killpg(parent.pid, signal.SIGINT)  # as a terminal sends it
        else:
            os.kill(parent.pid, signal.SIGTERM)
        started = time.monotonic()
        out, err = parent.communicate(timeout=60)
    assert time.monotonic() - started > 1  # it waited for the child to end
    assert count.read_text() == "1"  # the child got exactly one Ctrl-C
    signum = signal.SIGINT if how == "ctrl-c to the group" else signal.SIGTERM
    assert out.split() == ["3", f"[{signum.value}]"], out  # its exit code, and the signal remembered
    assert parent.returncode != 0 and "KeyboardInterrupt: signal" in err and "at child" in err


# a background job's (`nohup ... &`): Ctrl-C ignored from its start
IN_THE_BACKGROUND = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + PARENT
# a child as DVC is: Ctrl-C as Python sets it up at start (KeyboardInterrupt), no handler of its own
PLAIN_CHILD = textwrap.dedent(
    """
    import sys, time
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        open(sys.argv[1], "w").write("stopped")
        sys.exit(3)
    """
)


def test_a_background_job_ignores_ctrl_c_but_stops_its_child_with_it_on_sigterm(tmp_path):
    """An ignored signal stays ignored across exec: the child must not inherit it, or it cannot be stopped."""
    stopped = tmp_path / "stopped"
    with parent_of_a_ready_child(IN_THE_BACKGROUND, PLAIN_CHILD, stopped) as parent:
        os.killpg(parent.pid, signal.SIGINT)  # ignored, as a background job ignores it
        time.sleep(0.5)
        assert parent.poll() is None and not stopped.exists()
        os.kill(parent.pid, signal.SIGTERM)  # `kill PID`: passed on to the child as Ctrl-C
        out, _ = parent.communicate(timeout=30)
    assert stopped.read_text() == "stopped"
    assert out.split() == ["3", f"[{signal.SIGTERM.value}]"], out  # the child's exit code, SIGTERM remembered


def test_each_signal_reaches_every_running_child_group_once_and_an_ended_one_not_at_all():
    """Children started side by side (a sweep's workers, replicates in clones) hear each signal the parent got."""
    import signal
    import subprocess
    import sys
    import time

    from cifar_rounds.core.interrupts import Interrupts

    wait = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(7)); time.sleep(60)"
    ended = subprocess.Popen([sys.executable, "-c", "pass"], process_group=0)
    ended.wait()
    running = [subprocess.Popen([sys.executable, "-c", wait], process_group=0) for _ in range(2)]
    interrupts = Interrupts()
    time.sleep(1.0)  # the children have set their handlers
    interrupts.pass_on_to_all([ended, *running], signal.SIGINT)  # nothing received yet: nothing sent
    assert all(p.poll() is None for p in running)
    interrupts.signals.append(signal.SIGTERM)
    interrupts.pass_on_to_all([ended, *running], signal.SIGINT)
    assert [p.wait(timeout=30) for p in running] == [7, 7] and ended.returncode == 0
    interrupts.pass_on_to_all(running, signal.SIGINT)  # passed on already: not again (and no error for ended ones)
