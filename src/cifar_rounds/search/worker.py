"""One sweep worker, started by the sweep (search/sweep.py) once per training place: Optuna's own loop in a clone.

It takes a clone of the repository (analysis/clones.py) and runs `study.optimize` on the study, one trial at
a time, with Optuna's heartbeat: a trial whose worker died is failed once its heartbeat is GRACE_S old, and
tried again with the same values by Optuna's retry callback, in whichever worker next starts a trial. A
trial is `dvc exp run` up to `train` with every value set; the training reports each epoch to the trial
and stops when it is pruned. The objective is the value reported at the epoch `train.monitor` selected.
The saved experiment is then pushed to the repository. A trial whose experiment failed (its training
killed, say) has its MLflow runs ended and is tried again with the same values by the same callback;
a second failure of those values counts against the budget, a trial stopped with its sweep never does.
The worker stops once the study's budget is spent and no trial runs; when the sweep that started it
ends, it stops its trial, which is then tried again.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from cifar_rounds.analysis.clones import CLONES_DIR, LOGS_DIR, Clone, take_clone
from cifar_rounds.analysis.rounds import exp_run_command, load_preset
from cifar_rounds.core.errors import StageError, causes, run_stage
from cifar_rounds.core.interrupts import Interrupts, interrupts_caught
from cifar_rounds.core.params import ParamsError, load_params, with_overrides
from cifar_rounds.search.spec import load_sweep
from cifar_rounds.search.study import SURPLUS_ATTR, Driver, open_study, spent
from cifar_rounds.tracking.run import END_REASON_TAG
from cifar_rounds.tracking.store import open_client, repo_root
from cifar_rounds.training.trial import (
    BEST_EPOCH_ATTR,
    PARENT_RUN_ATTR,
    PRUNED_ATTR,
    STATE_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    study_storage,
)

HEARTBEAT_S = 10  # how often a worker's running trial says it is alive, seconds
GRACE_S = 60  # a trial silent this long is failed (its worker died) and tried again
POLL_S = 5.0  # how often a worker with nothing to start looks at the study again (others' trials may fail)
FINAL_ATTR = "not_retried"  # why a FAIL trial is not tried again (its values are invalid, or it diverged)
FAILURES_ATTR = "failures"  # experiments of these values that failed by themselves (not stopped by a signal)
RETRY_LOCK = "retry.lock"  # in the repository's clones folder: one worker at a time queues a failed trial again


class TrialFailed(Exception):
    """The trial's experiment failed; Optuna tells the study FAIL."""


@dataclass
class Worker:
    d: Driver | None  # set once the study is open: its storage's heartbeat calls back here
    clone: Clone
    commit: str
    trainings: int  # the project's trainings at once: the sweep's `--workers`
    team_remote: str | None
    interrupts: Interrupts

    def objective(self, trial) -> float:
        if surplus(self.d.study, trial.number, self.d.sweep.trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise TrialFailed("started past the budget by workers that asked at the same moment")
        values = self.d.trial_values(trial)
        try:
            with_overrides(self.d.base, values)
        except ParamsError as error:  # e.g. milestones past a searched num_epochs
            trial.set_user_attr(FINAL_ATTR, "invalid values")
            raise TrialFailed(f"invalid values ({error})") from None
        name = self.d.trial_name(trial.number)
        print(f"sweep: trial {trial.number} ({name}) starts in {self.clone.path.name}", flush=True)
        self.clone.reset(self.commit)
        log = self.clone.root / LOGS_DIR / f"{name}.log"
        code = self.run(exp_run_command(name, values, ["train"]))
        if code != 0:
            self.end_runs(trial.number, f"its experiment failed (exit {code}; {log})")
            if not self.interrupts.signals:  # stopped with the sweep, the values are not at fault
                trial.set_user_attr(FAILURES_ATTR, trial.user_attrs.get(FAILURES_ATTR, 0) + 1)
            raise TrialFailed(f"its experiment failed (exit {code}); DVC's output: {log}")
        try:
            self.clone.push(name, self.team_remote)
        except StageError as error:
            raise TrialFailed(str(error)) from None
        return reported(self.d.storage, self.d.sweep.study, trial.number)

    def run(self, command: list[str]) -> int:
        """`command` in the clone to its end; a signal to this worker is passed on to it as Ctrl-C."""
        name = command[command.index("-n") + 1]
        self.interrupts.child = self.clone.start(command, self.clone.root / LOGS_DIR / f"{name}.log", self.trainings)
        try:
            self.interrupts.pass_on()
            return self.interrupts.child.wait()
        finally:
            self.interrupts.child = None

    def end_runs(self, number: int, why: str) -> None:
        """Tag a failed trial's MLflow runs FAIL; end those still RUNNING as KILLED, saying why."""
        d = self.d
        experiment = d.store("reading the sweep's run", lambda: d.client.get_run(d.parent_run_id).info.experiment_id)
        found = f"tags.`{SWEEP_TAG}` = '{d.sweep.study}' and tags.`{TRIAL_TAG}` = '{number}'"
        for r in d.store("finding the trial's runs", lambda: d.client.search_runs([experiment], found)):
            d.store("tagging the trial's run", lambda: d.client.set_tag(r.info.run_id, STATE_TAG, "FAIL"))
            if r.info.status == "RUNNING":
                d.store("ending the trial's run", lambda: d.client.set_tag(r.info.run_id, END_REASON_TAG, why))
                d.store("ending the trial's run", lambda: d.client.set_terminated(r.info.run_id, "KILLED"))

    def ended(self, study, trial) -> None:
        """Optuna's callback after each trial: its end said in one line; a FAIL tried again with the same values
        (Optuna's retry) unless it was surplus, its values cannot succeed, or their experiment failed twice by
        itself (a trial stopped with its sweep or worker is always tried again)."""
        name = self.d.trial_name(trial.number)
        if trial.state.name != "FAIL":
            print(f"sweep: trial {trial.number} ({name}) {trial.state.name.lower()}", flush=True)
            return
        if trial.user_attrs.get(SURPLUS_ATTR):
            return
        again = FINAL_ATTR not in trial.user_attrs and trial.user_attrs.get(FAILURES_ATTR, 0) < 2
        if again and not retried_once(study, trial):
            return  # another worker failed it at the same moment, queued it again and said so
        why = "trying its values again" if again else trial.user_attrs.get(FINAL_ATTR, "its values failed twice")
        print(f"sweep: trial {trial.number} ({name}) failed; {why}", flush=True)

    def stale(self, study, trial) -> None:
        """Optuna's callback for a trial whose heartbeat stopped (its worker died): its runs ended, then as `ended`."""
        self.end_runs(trial.number, f"the sweep's worker running this trial sent no heartbeat for {GRACE_S} s")
        self.ended(study, trial)

    def one_trial(self) -> None:
        """One trial through `study.optimize`. A storage that stayed away stops the worker in its one line: Optuna,
        failing to tell the study, may raise another error while handling it."""
        try:
            self.d.study.optimize(
                self.objective, n_trials=1, catch=(TrialFailed,), callbacks=[self.ended], gc_after_trial=False
            )
        except Exception as error:
            stopped = next((link for link in causes(error) if isinstance(link, StageError)), None)
            if stopped is None or stopped is error:
                raise
            raise StageError(str(stopped)) from None

    def loop(self) -> None:
        """Trials one at a time until the budget is spent and none runs, or a signal comes."""
        import optuna

        while not self.interrupts.signals:
            optuna.storages.fail_stale_trials(self.d.study)
            if spent(self.d.study) < self.d.sweep.trials:
                self.one_trial()
            elif any(t.state.name == "RUNNING" for t in self.d.study.get_trials(deepcopy=False)):
                time.sleep(POLL_S)  # another trial may yet fail, and its values need a worker
            else:
                return


def retried_once(study, trial) -> bool:
    """Optuna's retry of the failed `trial`, unless a worker of this repository has already queued it: whether
    this call did. Two workers may both fail one stale trial: Optuna's check-and-set of its state relies on
    SELECT ... FOR UPDATE, which SQLite (a sweep's default storage) ignores, and each worker then calls back."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    lock = repo_root() / CLONES_DIR / RETRY_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if any(Retry.retry_history(t)[-1:] == [trial.number] for t in study.get_trials(deepcopy=False)):
            return False
        Retry()(study, trial)
    return True


def surplus(study, number: int, budget: int) -> bool:
    """Whether this running trial is one too many: workers that asked together may start more than the budget
    leaves; the last started go."""
    over = spent(study) - budget
    running = sorted(t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING")
    return over > 0 and number in running[-over:]


def reported(storage, study: str, number: int) -> float:
    """The objective at the epoch train.monitor selected (the checkpoint a round would evaluate): the training's
    report; PRUNED when the pruner stopped it; FAIL, not tried again, when that value is not finite."""
    import optuna

    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)
    frozen = storage.get_trial(trial_id)
    if frozen.user_attrs.get(PRUNED_ATTR):
        raise optuna.TrialPruned(f"pruned after epoch {max(frozen.intermediate_values, default=0)}")
    value = frozen.intermediate_values.get(frozen.user_attrs.get(BEST_EPOCH_ATTR))
    if value is None or not math.isfinite(value):
        storage.set_trial_user_attr(trial_id, FINAL_ATTR, "no finite objective")
        raise TrialFailed(f"no finite objective at its best epoch ({value})")
    return value


def watch_parent(parent: int) -> None:
    """SIGTERM to this worker once the sweep that started it has gone (killed, say): its trial then stops."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file")
    parser.add_argument("--commit", required=True, help="the commit every trial runs")
    parser.add_argument("--trainings", type=int, required=True, help="the sweep's trainings at once (--workers)")
    parser.add_argument("--team-remote", help="a git remote URL each trial's experiment is pushed to as well")
    args = parser.parse_args(argv)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    import optuna

    # the heartbeat and its helpers are marked experimental; Optuna warns of a heartbeat used outside optimize (a
    # study the worker only reads)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is said in one line, below
    base = load_params()
    sweep = load_sweep(args.sweep, base, load_preset)
    url, root = study_storage(sweep.storage, repo_root()), repo_root()
    with interrupts_caught() as interrupts:
        client, _ = open_client(base)
        worker = Worker(None, take_clone(root), args.commit, args.trainings, args.team_remote, interrupts)
        heartbeat = {
            "heartbeat_interval": HEARTBEAT_S,
            "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": worker.stale,
        }
        seed = f"{socket.gethostname()}:{os.getpid()}"
        study, storage, _ = open_study(sweep, url, base.tracking.store_patience_s, seed, heartbeat)
        worker.d = Driver(sweep, base, study, storage, client, study.user_attrs[PARENT_RUN_ATTR])
        worker.loop()
    interrupts.stop_if_any("the sweep's worker")


if __name__ == "__main__":
    run_stage(main)
