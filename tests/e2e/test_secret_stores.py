"""Stores that need passwords: a sweep and a round report against a PostgreSQL that asks for one and an MLflow server
behind its basic-auth app, the passwords given only through the environment, leave them in no output, log, MLflow
param, tag or artifact, git object or file of the repository; a URL holding one is refused before anything runs."""

import base64
import importlib.util
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import make_project, run, tracking_server
from pg import SMALL, postgresql

PG_SECRET, MLFLOW_SECRET, MLFLOW_USER = "PgS3cretQ7v2Lx9K", "MlS3cretW4n8Tz6R", "alice"
# MLflow's basic-auth app needs Flask-WTF (mlflow[auth], in requirements-test.txt); without it a plain server
AUTH_APP = importlib.util.find_spec("flask_wtf") is not None
SWEEP = {
    "study": "sec",
    "baseline": "round-2",
    "trials": 2,
    "fixed": {"train.num_epochs": 2, "train.lr_milestones": [1], "train.patience": 2},
    "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
    "sampler": {"kind": "random", "seed": 3},
    "pruner": {"kind": "none"},
}


def forms(secret: str) -> list[bytes]:
    """The secret as text, and as base64 from each of the three offsets it may start at (a basic-auth header, say)."""
    raw = secret.encode()
    encoded = [base64.b64encode(b"\0" * k + raw) for k in range(3)]
    return [raw, *(e[4 * math.ceil(k / 3) : 4 * ((k + len(raw)) // 3)] for k, e in enumerate(encoded))]


def leaks(places: dict[str, bytes], secrets: list[str]) -> list[str]:
    """The places that hold a secret in any of its forms."""
    needles = [f for s in secrets for f in forms(s)]
    return [where for where, data in places.items() if any(n in data for n in needles)]


@contextmanager
def mlflow_server_behind_basic_auth(folder: Path) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` whose admin is MLFLOW_USER with MLFLOW_SECRET; its URL."""
    if not AUTH_APP:
        with tracking_server(f"sqlite:///{folder}/server.db", folder / "artifacts") as url:
            yield url
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder}/basic_auth.db\nadmin_username = {MLFLOW_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    auth = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_SECRET,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-of-this-test",
    }
    backend = f"sqlite:///{folder}/server.db"
    with tracking_server(backend, folder / "artifacts", "--app-name", "basic-auth", **auth) as url:
        yield url


def mlflow_records(url: str, folder: Path) -> dict[str, bytes]:
    """Every run's params, tags, inputs and info as MLflow serves them, and every artifact downloaded."""
    client = MlflowClient(url)
    found = {}
    for experiment in client.search_experiments():
        found[f"experiment {experiment.name}"] = json.dumps(dict(experiment)).encode()
        for r in client.search_runs([experiment.experiment_id]):
            found[f"run {r.info.run_id}"] = json.dumps(r.to_dictionary()).encode()
            target = folder / r.info.run_id
            target.mkdir(parents=True)
            client.download_artifacts(r.info.run_id, "", str(target))
            found |= {f"artifact {p.relative_to(folder)}": p.read_bytes() for p in target.rglob("*") if p.is_file()}
    return found


def repository_records(project: Path) -> dict[str, bytes]:
    """Every file under the project (.git, .dvc's cache and the workers' clones included), and every git object unpacked
    (commits, experiment refs, stashes)."""
    found = {f"file {p.relative_to(project)}": p.read_bytes() for p in project.rglob("*") if p.is_file()}
    objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"], cwd=project, capture_output=True, check=True
    )
    found["git objects"] = objects.stdout
    return found


@pytest.mark.timeout(900)
def test_a_sweep_and_a_report_on_stores_that_need_passwords_leave_them_nowhere(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=6)
    with postgresql() as pg, mlflow_server_behind_basic_auth(tmp_path / "mlflow") as server:
        pg.require_password(PG_SECRET)
        assert pg.psql("SELECT 1", check=False).returncode != 0  # the password is needed: no trust
        assert pg.psql("SELECT 1", PGPASSWORD=PG_SECRET).returncode == 0
        creds = {
            "PGPASSWORD": PG_SECRET,
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": MLFLOW_SECRET,
        }
        if AUTH_APP:  # and the server refuses a client without credentials
            with pytest.raises(urllib.error.HTTPError) as anonymous:
                urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
            assert anonymous.value.code == 401
        project = make_project(tmp_path / "p", (archive, md5), **SMALL, **{"tracking.tracking_uri": server})
        run([sys.executable, "-m", "dvc", "repro", "split"], project)  # the trials' data once, not in each trial
        (project / "sweeps" / "sec.yaml").write_text(yaml.safe_dump({**SWEEP, "storage": pg.url("optuna")}))
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "a sweep on the team's PostgreSQL"], project)
        outputs = []

        # the password in the URL instead: refused in one line, before anything runs or is written
        leaky = tmp_path / "leaky.yaml"  # outside the repository: the file itself holds the password
        with_password = pg.url("optuna").replace("postgres@", f"postgres:{PG_SECRET}@")
        leaky.write_text(yaml.safe_dump({**SWEEP, "storage": with_password}))
        leaky_sweep = [sys.executable, "-m", "cifar_rounds.search.sweep", str(leaky), "--no-run"]
        refused = run(leaky_sweep, project, check=False, **creds)
        outputs.append(refused)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
        assert "storage: holds a password; put it in PGPASSWORD" in refused.stderr

        # the passwords from the environment only
        sweep = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/sec.yaml", "--workers", "2"]
        outputs.append(run(sweep, project, **creds))
        # two short rounds, one beside the workspace in a clone, and their report
        rounds = [sys.executable, "-m", "cifar_rounds.analysis.rounds", "run", "--epochs", "1", "--seeds", "1"]
        outputs.append(run([*rounds, "round-1", "-n", "seca"], project, **creds))
        outputs.append(run([*rounds, "round-2", "-n", "secb", "--workers", "1"], project, **creds))
        report = [sys.executable, "-m", "cifar_rounds.analysis.report", "seca", "secb"]
        outputs.append(run(report, project, **creds))
        assert (project / "reports" / "round-seca-vs-secb.md").exists(), outputs[-1].stdout[-2000:]

        for name, value in creds.items():
            monkeypatch.setenv(name, value)
        records = mlflow_records(server, tmp_path / "downloaded")
        runs = [k for k in records if k.startswith("run ")]
        assert len(runs) == 5, runs  # the sweep's run, its two trials, the two rounds' runs
        assert {"params.yaml", "sweep.json"} <= {k.rsplit("/", 1)[-1] for k in records}
        records |= repository_records(project)
        records |= {f"output {i}": (r.stdout + r.stderr).encode() for i, r in enumerate(outputs)}
        assert "git objects" in records and any(".dvc/tmp/clones/w1/.git" in k for k in records)
        header = b"Authorization: Basic " + base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_SECRET}".encode())
        assert leaks({"a basic-auth header": header}, [MLFLOW_SECRET]) == ["a basic-auth header"]  # the search finds
        assert leaks(records, [PG_SECRET, MLFLOW_SECRET]) == []
