"""Several machines, one study, one tracking store, both behind passwords: a real PostgreSQL that asks for one,
behind Optuna and behind an `mlflow server` that runs MLflow's basic-auth app.

Two clones of the project stand for two machines: each runs the same sweep command (its own workers
in its own clones), on one study in PostgreSQL and one tracking server whose backend store is
PostgreSQL, pushing each trial to the team's git remote with its files in the DVC remote. Their
experiments reach a third clone, which compares the rounds and promotes the study's best trial.
The passwords come from the environment only: they are in no output, log, MLflow param, tag or
artifact, git object or file of any clone or remote, and a sweep file holding one is refused first.
"""

import base64
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import env, make_project, run, tracking_server
from pg import SMALL, postgresql

TRIALS = 3  # the study's budget, shared by the two machines (one worker each)
PG_SECRET, MLFLOW_SECRET, MLFLOW_USER = "PgS3cretQ7v2Lx9K", "MlS3cretW4n8Tz6R", "alice"
CREDENTIALS = {
    "PGPASSWORD": PG_SECRET,
    "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
    "MLFLOW_TRACKING_PASSWORD": MLFLOW_SECRET,
}
# MLflow's basic-auth app needs Flask-WTF (mlflow[auth], in requirements-test.txt); without it a plain server
AUTH_APP = importlib.util.find_spec("flask_wtf") is not None


def machine(origin: Path, target: Path) -> Path:
    """A clone of the shared repository: another machine."""
    run(["git", "clone", "-q", str(origin), str(target)], origin.parent)
    run(["git", "config", "user.email", "pipeline@localhost"], target)
    run(["git", "config", "user.name", "cifar-rounds"], target)
    return target


@contextmanager
def mlflow_server_behind_basic_auth(backend: str, folder: Path) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` over `backend` whose admin is MLFLOW_USER with MLFLOW_SECRET; its URL."""
    if not AUTH_APP:
        with tracking_server(backend, folder / "artifacts", PGPASSWORD=PG_SECRET) as url:
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
        "PGPASSWORD": PG_SECRET,
    }
    with tracking_server(backend, folder / "artifacts", "--app-name", "basic-auth", **auth) as url:
        yield url


def forms(secret: str) -> list[bytes]:
    """The secret as text, and as base64 from each of the three offsets it may start at (a basic-auth header, say)."""
    raw = secret.encode()
    encoded = [base64.b64encode(b"\0" * k + raw) for k in range(3)]
    return [raw, *(e[4 * math.ceil(k / 3) : 4 * ((k + len(raw)) // 3)] for k, e in enumerate(encoded))]


def leaks(places: dict[str, bytes], secrets: list[str]) -> list[str]:
    """The places that hold a secret in any of its forms."""
    needles = [f for s in secrets for f in forms(s)]
    return [where for where, data in places.items() if any(n in data for n in needles)]


def mlflow_records(client: MlflowClient, folder: Path) -> dict[str, bytes]:
    """Every run's params, tags, inputs and info as MLflow serves them, and every artifact downloaded."""
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


def repository_records(repo: Path) -> dict[str, bytes]:
    """Every file under a repository (.git, .dvc's cache and the workers' clones included), and every git object
    unpacked (commits, experiment refs, stashes)."""
    found = {f"file {p}": p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo, capture_output=True)
    found[f"git objects of {repo}"] = objects.stdout
    return found


@pytest.mark.timeout(2400)
def test_two_machines_run_one_study_on_stores_behind_passwords_and_a_third_compares_their_rounds(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=360, test_size=100, seed=4)
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    for name, value in CREDENTIALS.items():  # this test's own clients too, from the environment
        monkeypatch.setenv(name, value)
    with postgresql() as pg:
        pg.require_password(PG_SECRET)
        assert pg.psql("SELECT 1", check=False).returncode != 0  # the password is needed: no trust
        assert pg.psql("SELECT 1", PGPASSWORD=PG_SECRET).returncode == 0
        with mlflow_server_behind_basic_auth(pg.url("mlflow"), tmp_path / "mlflow") as server:
            outputs = machines_sweep_compare_and_promote(tmp_path, pg, server, (archive, md5), origin, remote)
            records = mlflow_records(MlflowClient(server), tmp_path / "downloaded")
    assert {"params.yaml", "sweep.json"} <= {k.rsplit("/", 1)[-1] for k in records}
    for repo in ("first", "second", "third", "origin.git", "dvc-remote"):
        records |= repository_records(tmp_path / repo)
    records |= {f"output {i}": text.encode() for i, text in enumerate(outputs)}
    assert any(".dvc/tmp/clones/w0/.git" in k for k in records)  # the workers' clones were searched
    header = b"Authorization: Basic " + base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_SECRET}".encode())
    assert leaks({"a basic-auth header": header}, [MLFLOW_SECRET]) == ["a basic-auth header"]  # the search finds
    assert leaks(records, [PG_SECRET, MLFLOW_SECRET]) == []


def machines_sweep_compare_and_promote(tmp_path, pg, server: str, data, origin: Path, remote: Path) -> list[str]:
    """The two machines' sweep, a round on each, their comparison and promotion on a third; every output."""
    if AUTH_APP:  # the server refuses a client without credentials
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert anonymous.value.code == 401
    first = make_project(tmp_path / "first", data, **SMALL)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], first)
    sweep = {
        "study": "team",
        "baseline": "round-2",
        "trials": TRIALS,
        "storage": pg.url("optuna"),
        "fixed": {"train.num_epochs": 2, "train.lr_milestones": [1], "train.patience": 2},
        "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        "sampler": {"kind": "random", "seed": 1},
        "pruner": {"kind": "none"},
    }
    (first / "sweeps" / "team.yaml").write_text(yaml.safe_dump(sweep))
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "team sweep"], first)
    run(["git", "remote", "add", "origin", str(origin)], first)
    run(["git", "push", "-q", "origin", "main"], first)
    second = machine(origin, tmp_path / "second")
    shared = {"MLFLOW_TRACKING_URI": server, **CREDENTIALS}
    outputs = []

    # the password in the URL instead: refused in one line, before anything runs or is written
    leaky = tmp_path / "leaky.yaml"  # outside the repository: the file itself holds the password
    leaky.write_text(yaml.safe_dump({**sweep, "storage": pg.url("optuna").replace("@", f":{PG_SECRET}@")}))
    refused = run([sys.executable, "-m", "cifar_rounds.search.sweep", str(leaky), "--no-run"], first, False, **shared)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "storage: holds a password; put it in PGPASSWORD" in refused.stderr
    outputs.append(refused.stdout + refused.stderr)

    cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/team.yaml", "--workers", "1"]
    push = ["--push", "origin"]  # each trial to the team's git remote, its files to the DVC remote
    drivers = [
        subprocess.Popen(
            cmd + push,
            cwd=m,
            env=env(**shared),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for m in (first, second)
    ]
    try:
        outs = [d.communicate(timeout=1500)[0] for d in drivers]
    finally:
        for d in drivers:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
    outputs += outs
    assert [d.returncode for d in drivers] == [0, 0], "\n".join(o[-2000:] for o in outs)

    study = optuna.load_study(study_name="team", storage=pg.url("optuna"))
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]  # both asked for the last place
    assert len(counted) == TRIALS and all(t.state.name == "COMPLETE" for t in counted)  # the budget, across both
    on = {
        m.name: [n for n in range(TRIALS) if f"trial {n} (team-t{n:03d}) complete" in o]
        for m, o in zip((first, second), outs)
    }
    assert sorted(on["first"] + on["second"]) == list(range(TRIALS)), outs  # each trial run on one machine
    print("trials per machine:", on)
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    runs = [r for r in client.search_runs([experiment], "tags.sweep = 'team'") if "sweep.trial" in r.data.tags]
    numbers = sorted(int(r.data.tags["sweep.trial"]) for r in runs)
    assert numbers == sorted(t.number for t in counted)  # each trial one run, none run twice
    assert {r.info.status for r in runs} == {"FINISHED"}

    # a round on each machine (the second's beside its workspace, in a clone), shared through the remotes and
    # compared on a third
    rounds = [sys.executable, "-m", "cifar_rounds.analysis.rounds", "run", "--seeds", "1", "--epochs", "2"]
    for m, preset, where in ((first, "round-1", []), (second, "round-2", ["--workers", "1"])):
        ran = run([*rounds, preset, *where], m, **shared)
        outputs.append(ran.stdout + ran.stderr)
        run(["dvc", "exp", "push", "origin", f"{preset}-s0"], m)
    third = machine(origin, tmp_path / "third")
    run(["dvc", "exp", "pull", "origin", "round-1-s0", "round-2-s0"], third)
    # every trial of both machines, through the team's remotes, its trained model with it
    trials = [f"team-t{n:03d}" for n in range(TRIALS)]
    run(["dvc", "exp", "pull", "origin", *trials], third)
    assert set(trials) <= set(run(["dvc", "exp", "ls", "--name-only", "-A"], third).stdout.split())
    run(["dvc", "exp", "apply", trials[-1]], third)
    assert (third / "models" / "best.pt").stat().st_size > 0
    run(["git", "checkout", "--", "."], third)
    report = run([sys.executable, "-m", "cifar_rounds.analysis.report", "round-1", "round-2"], third, **shared)
    outputs.append(report.stdout + report.stderr)
    # each round's replicate reached the third machine (its stdout names the rounds whatever it found)
    text = (third / "reports" / "round-round-1-vs-round-2.md").read_text()
    assert "Seeds: 1 (round-1-s0)" in text and "Seeds: 1 (round-2-s0)" in text, text[:2000]
    # and the shared store: the report is logged to the run the second machine trained
    (candidate,) = client.search_runs([experiment], "tags.round = 'round-2'")
    logged = {a.path for a in client.list_artifacts(candidate.info.run_id, "report")}
    assert logged == {"report/round-round-1-vs-round-2.md", "report/round-round-1-vs-round-2.png"}
    promoted = run(cmd[:4] + ["--no-run", "--promote", "team-best"], third, **shared)
    assert (third / "rounds" / "team-best.yaml").exists(), promoted.stdout[-2000:]
    outputs.append(promoted.stdout + promoted.stderr)
    return outputs
