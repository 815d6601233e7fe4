"""Errors are judged by their type and code, never by their words: a read-only database fails at once, a locked
one or a server away is waited for, and a message that happens to hold "503" or a database's words decides nothing.

Each case is real: sqlite files, MLflow's sqlite store, and a tiny HTTP server answering MLflow's client.
"""

import http.server
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Dataset, DatasetInput
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.patience import patiently
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.tracking.store import patient_sqlite
from cifar_rounds.tracking.study_storage import patient_storage

from helpers import free_port

PATIENCE_S = 300.0  # the default tracking.store_patience_s: a failure judged wrongly would wait all of it
AT_ONCE_S = 2.0  # what "at once" means here, seconds, on a loaded CI machine
RUN_ID = "8f2a503c9d7e4b1a8c6f0e2d4b6a8c0e"  # a run id that happens to hold "503"


def read_only(path: Path) -> str:
    """A SQLAlchemy URL opening the sqlite file read-only: writes fail with SQLITE_READONLY, even as root
    (a file's mode does not stop root)."""
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def study_at(path: Path) -> None:
    optuna.create_study(storage=f"sqlite:///{path}", study_name="s")


@contextmanager
def locked_for(path: Path, seconds: float) -> Iterator[None]:
    """The sqlite file held by another connection's exclusive lock, released after `seconds` by a timer."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(seconds, holder.rollback)
    release.start()
    try:
        yield
    finally:
        release.join()
        holder.close()


def test_a_read_only_study_storage_fails_at_once_not_after_the_patience(tmp_path, capsys):
    study_at(tmp_path / "optuna.db")
    url = read_only(tmp_path / "optuna.db")
    study = optuna.load_study(study_name="s", storage=patient_storage(url, PATIENCE_S, wait_to_open=False))
    start = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
        study.set_user_attr("note", "a write")  # not study.ask: Optuna retries a new trial itself, for seconds
    assert time.monotonic() - start < AT_ONCE_S
    assert refused.value.__cause__.orig.sqlite_errorcode == sqlite3.SQLITE_READONLY
    assert "retrying" not in capsys.readouterr().out


def test_a_locked_study_storage_is_waited_for_until_the_lock_is_released(tmp_path, capsys):
    study_at(tmp_path / "optuna.db")
    url = f"sqlite:///{tmp_path / 'optuna.db'}?timeout=0"  # the driver does not wait for a lock: the storage does
    study = optuna.load_study(study_name="s", storage=patient_storage(url, PATIENCE_S, wait_to_open=False))
    with locked_for(tmp_path / "optuna.db", seconds=1.0):
        trial = study.ask()
    study.tell(trial, 0.5)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    out = capsys.readouterr().out
    assert out.count("is unreachable") == 1 and "database is locked" in out


def test_a_locked_store_file_is_waited_for_by_the_rebase_connection(tmp_path, capsys):
    sqlite3.connect(tmp_path / "mlflow.db").close()
    with locked_for(tmp_path / "mlflow.db", seconds=1.0):
        with patient_sqlite(tmp_path / "mlflow.db", PATIENCE_S) as con:
            assert con.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    assert capsys.readouterr().out.count("the MLflow store is busy") == 1


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """A real MLflow sqlite store, migrated once for the module (the migration takes seconds)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(url).search_experiments()
    return url


def new_run(client: MlflowClient) -> str:
    return client.create_run(client.create_experiment(uuid.uuid4().hex)).info.run_id


def test_a_read_only_mlflow_store_fails_at_once_not_after_the_patience(store_url, capsys):
    experiment_id = MlflowClient(store_url).create_experiment(uuid.uuid4().hex)
    client = MlflowClient(read_only(Path(store_url.removeprefix("sqlite:///"))))
    start = time.monotonic()
    with pytest.raises(StageError, match="^tracking: creating the run failed"):
        patiently(partial(client.create_run, experiment_id), "creating the run", PATIENCE_S)
    assert time.monotonic() - start < AT_ONCE_S and "retrying" not in capsys.readouterr().out


def test_a_refusal_quoting_the_words_of_an_outage_fails_at_once(store_url):
    """MLflow quotes the values it refuses: a param whose value reads "database is locked" is no lock."""
    client = MlflowClient(store_url)
    run_id = new_run(client)
    client.log_param(run_id, "note", "database is locked")
    start = time.monotonic()
    with pytest.raises(StageError, match="changing the note failed .*Changing param values is not allowed"):
        patiently(
            partial(client.log_param, run_id, "note", "Connection refused (503)"), "changing the note", PATIENCE_S
        )
    assert time.monotonic() - start < AT_ONCE_S


class Answer(http.server.BaseHTTPRequestHandler):
    """Each request answered with the server's next (status, JSON body), its path recorded."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        status, body = self.server.answers.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows what a failing test printed, and these lines are not it."""


class Server(threading.Thread):
    """An HTTP server on 127.0.0.1:`port`, listening from `after_s` seconds on (a closed port until then), that
    answers request after request with `answers`; `paths` holds the requests it answered."""

    def __init__(self, answers: list[tuple[int, dict]], port: int, after_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.answers, self.port, self.after_s, self.paths = list(answers), port, after_s, []
        self.listening = threading.Event()

    def run(self) -> None:
        time.sleep(self.after_s)
        self.httpd = http.server.HTTPServer(("127.0.0.1", self.port), Answer)
        self.httpd.answers, self.httpd.paths = self.answers, self.paths
        self.listening.set()
        self.httpd.serve_forever(poll_interval=0.05)

    def __enter__(self) -> "Server":
        self.start()
        if not self.after_s:
            self.listening.wait()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc_info: object) -> None:
        self.listening.wait()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.join()


@pytest.fixture
def no_client_retries(monkeypatch) -> None:
    """MLflow's client retries a refused connection or a 503 by itself for minutes first; here the store's own
    patience is what is tested."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_a_missing_run_whose_id_holds_503_fails_at_once_and_a_real_503_is_waited_for(no_client_retries, capsys):
    missing = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run with id={RUN_ID} not found"})
    busy = (503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "the store is busy"})
    with Server([missing, busy, (200, {})], free_port()) as server:
        log_param = partial(MlflowClient(server.url).log_param, RUN_ID, "lr", "0.1")
        start = time.monotonic()
        with pytest.raises(StageError, match=f"^tracking: logging a param failed .*{RUN_ID} not found"):
            patiently(log_param, "logging a param", PATIENCE_S)
        assert time.monotonic() - start < AT_ONCE_S
        assert "is busy" not in capsys.readouterr().out
        patiently(log_param, "logging a param", PATIENCE_S)
    assert capsys.readouterr().out.count("the MLflow store is busy") == 1


def test_a_refused_connection_is_waited_for_until_the_server_answers(no_client_retries, capsys):
    with Server([(200, {})], free_port(), after_s=1.0) as server:
        patiently(partial(MlflowClient(server.url).log_param, RUN_ID, "lr", "0.1"), "logging a param", PATIENCE_S)
    assert capsys.readouterr().out.count("the MLflow store is busy") == 1 and len(server.paths) == 1


def datasets() -> list[DatasetInput]:
    return [DatasetInput(Dataset(name="cifar10-train", digest="0123abcd", source_type="local", source="data.npz"))]


@contextmanager
def inserted_first_by(client: MlflowClient, run_id: str) -> Iterator[list[str]]:
    """Another training logs the same new dataset to `run_id` just before this process inserts it: the race
    two trainings starting together run, made certain. Yields the inserts of the dataset that were tried."""
    tried = []

    def insert_theirs_first(conn, cursor, statement: str, *args: object) -> None:
        if statement.startswith("INSERT INTO datasets"):
            tried.append(statement)
            if len(tried) == 1:
                client.log_inputs(run_id, datasets=datasets())

    event.listen(Engine, "before_cursor_execute", insert_theirs_first)
    try:
        yield tried
    finally:
        event.remove(Engine, "before_cursor_execute", insert_theirs_first)


def test_a_lost_race_to_insert_a_dataset_into_the_sqlite_store_is_tried_again(store_url):
    client = MlflowClient(store_url)
    mine = new_run(client)
    theirs = client.create_run(client.get_run(mine).info.experiment_id).info.run_id
    with inserted_first_by(client, theirs) as tried:
        Tracker(client, mine, patience_s=5).log_inputs(datasets())
    # mine, which let theirs in first and then failed on the duplicate key, and theirs; the retry found theirs
    assert len(tried) == 2
    for run_id in (mine, theirs):
        (logged,) = client.get_run(run_id).inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("cifar10-train", "0123abcd")


def test_a_server_refusing_a_duplicate_dataset_in_its_own_language_is_tried_once_more(no_client_retries):
    """A server on a PostgreSQL whose lc_messages is German: the client sees BAD_REQUEST, and these words."""
    german = "(psycopg2.errors.UniqueViolation) doppelter Schlüsselwert verletzt Unique-Constraint »dataset_pk«"
    refused = (400, {"error_code": "BAD_REQUEST", "message": german})
    with Server([refused, (200, {})], free_port()) as server:
        Tracker(MlflowClient(server.url), RUN_ID, patience_s=5).log_inputs(datasets())
    assert server.paths == ["/api/2.0/mlflow/runs/log-inputs"] * 2


def test_a_lost_race_to_create_the_studys_tables_is_known_by_its_code_not_its_words():
    """Sweeps on two machines starting on a new database both create its tables: the loser tries again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    from cifar_rounds.tracking.patience import lost_a_creation_race

    class PgError(Exception):
        def __init__(self, words: str, pgcode: str) -> None:
            super().__init__(words)
            self.pgcode = pgcode

    assert lost_a_creation_race(ProgrammingError("CREATE TABLE studies", {}, PgError("no words", "42P07")))
    assert lost_a_creation_race(IntegrityError("CREATE TYPE", {}, PgError("no words", "23505")))
    assert not lost_a_creation_race(ProgrammingError("x", {}, PgError('relation "studies" already exists', "42601")))
    assert not lost_a_creation_race(RuntimeError("duplicate key value violates unique constraint"))
