"""The study's storage waits out a database that went away, says so once, and stops in one line past the patience."""

import optuna
import pytest
from sqlalchemy.exc import OperationalError

from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.study_storage import patient_storage, retried

URL = "postgresql+psycopg2://team:secret@db.example:5432/optuna"


def refused() -> OperationalError:
    return OperationalError(
        "SELECT 1", {}, Exception('connection to server at "db.example" failed: Connection refused')
    )


def failing(times: int, error=refused):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= times:
            raise error()
        return "answer"

    return call, calls


def test_an_unreachable_database_is_retried_with_one_line_naming_it_without_its_password(capsys):
    call, calls = failing(3)
    assert retried(call, URL, patience_s=30) == "answer" and len(calls) == 4
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "db.example" in lines[0] and "Connection refused" in lines[0]
    assert "secret" not in lines[0] and "tracking.store_patience_s" in lines[0]


def test_other_errors_are_raised_as_they_are():
    call, calls = failing(1, lambda: KeyError("no study"))
    with pytest.raises(KeyError):
        retried(call, URL, patience_s=30)
    assert len(calls) == 1


def test_past_the_patience_it_stops_in_one_line_naming_the_storage(capsys):
    call, _ = failing(1000)
    with pytest.raises(StageError) as stopped:
        retried(call, URL, patience_s=1.5)
    message = str(stopped.value)
    assert "\n" not in message and "db.example:5432/optuna" in message and "secret" not in message
    assert "stayed unreachable for 2 s" in message and "run the same command again" in message


def test_a_study_on_the_patient_storage_works_and_each_storage_call_is_retried(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = patient_storage(url, 30.0, wait_to_open=False)
    study = optuna.create_study(storage=storage, study_name="s")
    assert study._storage is storage  # every call of the study and its trials goes through it
    inner_get, failures = storage.inner.get_all_trials, []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise optuna.exceptions.StorageInternalError("commit failed") from refused()
        return inner_get(*args, **kwargs)

    storage.inner.get_all_trials = flaky
    trial = study.ask()
    trial.report(0.5, 1)
    study.tell(trial, 0.5)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] and failures == [1]
    assert capsys.readouterr().out.count("is unreachable") == 1


def test_after_waiting_out_the_patience_every_call_fails_at_once_and_a_missed_heartbeat_is_silent(tmp_path, capsys):
    import time

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = patient_storage(url, 1.0, wait_to_open=False, heartbeat={"heartbeat_interval": 1, "grace_period": 2})
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()

    def away(*args, **kwargs):
        raise refused()

    storage.inner.get_all_trials = away
    storage.inner.record_heartbeat = away
    storage.record_heartbeat(trial._trial_id)  # missed, said nowhere: the next beat tries again
    assert capsys.readouterr().out == ""
    with pytest.raises(StageError):
        study.trials  # waits out the patience, saying so once
    started = time.monotonic()
    with pytest.raises(StageError) as again:
        storage.get_trial(trial._trial_id)  # the process is stopping: no second wait, no second line
    assert time.monotonic() - started < 0.5 and "stayed unreachable" in str(again.value)
    assert capsys.readouterr().out.count("is unreachable") == 1
