"""The tracker's writes: a dataset another training inserted a moment earlier is found on the second try."""

import pytest
from mlflow.entities import Dataset, DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.run import Tracker

# what an `mlflow server` on PostgreSQL answered the loser of two trainings that logged a new dataset at once
RACE = (
    '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"\n'
    "DETAIL:  Key (experiment_id, name, digest)=(1, cifar10-train, 0123abcd) already exists."
)


def tracker_failing_first(tmp_path, *errors: str, code: int = BAD_REQUEST) -> tuple[Tracker, MlflowClient, list[int]]:
    """A tracker on a real sqlite store whose first log_inputs calls fail with `errors` under MLflow's error `code`
    (a server's answer to a database error it did not expect is BAD_REQUEST), then go through."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    real, calls, pending = client.log_inputs, [], list(errors)

    def log_inputs(*args, **kwargs):
        calls.append(1)
        if pending:
            raise MlflowException(pending.pop(0), error_code=code)
        return real(*args, **kwargs)

    client.log_inputs = log_inputs
    return Tracker(client, run_id, patience_s=5), client, calls


def datasets() -> list[DatasetInput]:
    return [DatasetInput(Dataset(name="cifar10-train", digest="0123abcd", source_type="local", source="data.npz"))]


@pytest.mark.parametrize("said", [RACE, "UNIQUE constraint failed: datasets.experiment_id, datasets.name"])
def test_a_lost_race_to_insert_a_new_dataset_is_tried_again_and_the_dataset_is_logged_once(tmp_path, said):
    tracker, client, calls = tracker_failing_first(tmp_path, said)
    tracker.log_inputs(datasets())
    assert len(calls) == 2
    (logged,) = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("cifar10-train", "0123abcd")


def test_a_unique_key_error_that_persists_and_any_other_error_stay_one_line(tmp_path):
    tracker, _, calls = tracker_failing_first(tmp_path / "a", RACE, RACE)
    with pytest.raises(StageError, match="^tracking: logging the datasets failed .*duplicate key"):
        tracker.log_inputs(datasets())
    assert len(calls) == 2  # once more, not forever
    tracker, _, calls = tracker_failing_first(tmp_path / "b", "bad digest", code=INVALID_PARAMETER_VALUE)
    with pytest.raises(StageError, match="logging the datasets failed .*bad digest"):
        tracker.log_inputs(datasets())
    assert len(calls) == 1
