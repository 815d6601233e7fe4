"""Secrets stay out of what we log, commit and print: a store URL holding a password is refused in one line naming
where the password goes; a missing database driver is one line naming its package; a tracking server behind basic
auth is checked with the credentials MLflow itself sends."""

import base64
import http.server
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml

from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.cli.demo import init_project
from cifar_rounds.core.errors import StageError
from cifar_rounds.core.params import PARAMS_FILE, ParamsError, SweepParams, with_overrides
from cifar_rounds.search.spec import load_sweep
from cifar_rounds.search.study import open_storage
from cifar_rounds.tracking.store import check_reachable, tracking_uri
from cifar_rounds.training.trial import open_trial

from helpers import REPO, repo_params, run

SECRET = "S3cretPw"
MLFLOW_PLACE, PG_PLACE = "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"
SWEEP = {
    "study": "s",
    "baseline": "round-2",
    "trials": 2,
    "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
}


def one_line_without_the_secret(text: str) -> str:
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    assert SECRET not in text, text
    return text


@pytest.mark.parametrize(
    "field, url, place",
    [
        ("tracking.tracking_uri", f"http://alice:{SECRET}@127.0.0.1:9/", MLFLOW_PLACE),
        ("tracking.tracking_uri", f"https://alice:{SECRET}@mlflow.internal", MLFLOW_PLACE),
        ("tracking.tracking_uri", f"postgresql+psycopg2://team:{SECRET}@db.internal/mlflow", PG_PLACE),
        ("sweep.storage", f"postgresql+psycopg2://team:{SECRET}@db.internal/optuna", PG_PLACE),
        ("sweep.storage", f"postgresql://team:{SECRET}@db.internal/optuna", PG_PLACE),
        ("sweep.storage", f"postgresql+psycopg2://team@db.internal/optuna?password={SECRET}", PG_PLACE),
    ],
)
def test_a_url_holding_a_password_is_refused_naming_the_field_and_where_the_password_goes(field, url, place):
    with pytest.raises(ParamsError) as error:
        with_overrides(repo_params(), {field: url})
    message = one_line_without_the_secret(str(error.value))
    assert f"{field}: holds a password; put it in {place}" in message and "not in the URL" in message
    # the same URL naming only its user is taken: no secret, and libpq finds the ~/.pgpass line by it
    user_only = url.replace(f":{SECRET}@", "@").replace(f"?password={SECRET}", "")
    assert with_overrides(repo_params(), {field: user_only}).flat()[field] == user_only


def test_the_params_cli_refuses_a_password_in_one_line(tmp_path, monkeypatch, capsys):
    from cifar_rounds.cli.check import main

    raw = yaml.safe_load((REPO / PARAMS_FILE).read_text())
    raw["tracking"]["tracking_uri"] = f"http://alice:{SECRET}@127.0.0.1:9/"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["params.yaml"])
    out, err = capsys.readouterr()
    assert stopped.value.code == 1 and out == ""
    assert "tracking.tracking_uri: holds a password" in one_line_without_the_secret(err.rstrip("\n"))


def test_a_sweep_files_storage_holding_a_password_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": f"postgresql+psycopg2://team:{SECRET}@db.internal/optuna"}))
    with pytest.raises(ParamsError) as error:
        load_sweep(path, repo_params(), load_preset)
    message = one_line_without_the_secret(str(error.value))
    assert f"{path}: storage: holds a password; put it in {PG_PLACE}" in message


def test_a_password_in_mlflow_tracking_uri_is_refused_before_anything_prints_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:9/")
    with pytest.raises(StageError) as error:
        tracking_uri(repo_params(), tmp_path)
    message = one_line_without_the_secret(str(error.value))
    assert f"MLFLOW_TRACKING_URI: holds a password; put it in {MLFLOW_PLACE}" in message
    # relocate prints the store it finds: the same line, and nothing else
    (tmp_path / "params.yaml").write_text((REPO / PARAMS_FILE).read_text())
    uri = f"http://alice:{SECRET}@127.0.0.1:9/"
    result = run([sys.executable, "-m", "cifar_rounds.cli.relocate"], tmp_path, check=False, MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 1 and result.stdout == ""
    assert "MLFLOW_TRACKING_URI: holds a password" in one_line_without_the_secret(result.stderr)


def test_a_missing_database_driver_is_one_line_naming_its_package(tmp_path, monkeypatch, capsys):
    from cifar_rounds.analysis.report import main
    from cifar_rounds.core.errors import run_stage

    params = with_overrides(repo_params(), {"tracking.tracking_uri": "postgresql+psycopg2://team@127.0.0.1:1/mlflow"})
    project = tmp_path / "p"
    init_project(REPO, project, params)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a project on PostgreSQL"], project)
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # an import of it fails as in an environment without it
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["report", "round-1", "round-2"])
    with pytest.raises(SystemExit) as stopped:
        run_stage(main)
    out, err = capsys.readouterr()
    assert stopped.value.code == 1 and out == "", err
    line = one_line_without_the_secret(err)
    assert "error: tracking.tracking_uri: postgresql+psycopg2:// needs the package psycopg2-binary (pip install" in line


def test_a_sweep_whose_storage_driver_is_missing_is_one_line_in_the_driver_and_the_trial(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # an import of it fails as in an environment without it
    url = "postgresql+psycopg2://team@127.0.0.1:1/optuna"
    with pytest.raises(StageError, match=r"^sweep storage: postgresql\+psycopg2:// needs the package psycopg2-binary"):
        open_storage(url, 1.0)
    with pytest.raises(StageError, match=r"^sweep.storage: postgresql\+psycopg2:// needs the package psycopg2-binary"):
        open_trial(SweepParams(study="s", trial=0, storage=url), 1.0)


@contextmanager
def basic_auth_server(user: str, password: str) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 that answers every path, /health too, only to these credentials; its port."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            allowed = self.headers.get("Authorization") == expected
            self.send_response(200 if allowed else 401)
            if not allowed:
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_behind_basic_auth_is_reachable_with_mlflows_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials of the machine's
    with basic_auth_server("alice", SECRET) as port:
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        check_reachable(url, "tracking.tracking_uri")
        check_reachable(f"http://alice@127.0.0.1:{port}/", "tracking.tracking_uri")  # a user alone, as accepted
        with pytest.raises(StageError) as error:
            check_reachable(f"http://alice:{SECRET}@127.0.0.1:{port}", "MLFLOW_TRACKING_URI")
        assert f"MLFLOW_TRACKING_URI: holds a password; put it in {MLFLOW_PLACE}" in str(error.value)
        one_line_without_the_secret(str(error.value))
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(StageError) as error:
            check_reachable(url, "tracking.tracking_uri")
        message = one_line_without_the_secret(str(error.value))
        assert f"the MLflow server {url} refused the credentials sent (HTTP 401)" in message
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
