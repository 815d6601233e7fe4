"""Kills at awkward moments, deleted or changed files, a busy or dead store: nothing lost, nothing wrong.

Kills are deterministic: a small driver runs the real train stage with one method
wrapped so that the process SIGKILLs itself at the chosen moment.
"""

import fcntl
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import yaml
from filelock import FileLock
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifar_rounds.core.files import atomic_path
from cifar_rounds.data.synthetic import write_archive

from helpers import env, make_project, read_json, run

pytestmark = pytest.mark.slow
EPOCHS = 3


def train_args(tag: str) -> list[str]:
    return [
        "--split",
        "data/split.npz",
        "--models",
        f"models_{tag}",
        "--history",
        f"reports/{tag}.csv",
        "--summary",
        f"reports/{tag}.json",
    ]


def train(project, tag: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cifar_rounds.stages.train", *train_args(tag)], project, check=check, **extra_env)


# Wraps `target` (module.Class.method) so that the process SIGKILLs itself after (or instead of) it.
KILLER = """
import os, signal, sys
from cifar_rounds.stages import train
from cifar_rounds.tracking import registry, run as tracking
from cifar_rounds.training import sink
from cifar_rounds.core.errors import run_stage
owner, name = {owner}, "{name}"
original = getattr(owner, name)
def wrapped(*args, **kwargs):
    if {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, wrapped)
sys.argv = ["train", *{args}]
run_stage(train.main)
"""


def killed_train(project, tag: str, owner: str, name: str, before: str = "False", after: str = "False") -> None:
    code = KILLER.format(owner=owner, name=name, before=before, after=after, args=train_args(tag))
    result = run([sys.executable, "-c", textwrap.dedent(code)], project, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def kill_after_epoch(project, tag: str, epoch: int) -> None:
    killed_train(project, tag, "sink.RunSink", "epoch", after=f"args[1].epoch == {epoch}")


def store(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project}/mlflow.db")


def set_params(project, **changes) -> str:
    """Change dotted params in the project's params.yaml; returns the old text."""
    good = (project / "params.yaml").read_text()
    raw = yaml.safe_load(good)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return good


SMALL = {"data.val_size": 50, "model.width": 8, "train.batch_size": 50, "tracking.log_model": False}


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.tar.gz"
    return path, write_archive(path, train_size=300, test_size=100, seed=3)


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_archive):
    path = make_project(
        tmp_path_factory.mktemp("recovery"),
        small_archive,
        **{**SMALL, "train.num_epochs": EPOCHS, "train.lr_milestones": [2], "train.patience": EPOCHS},
    )
    run(["dvc", "repro", "split"], path)
    return path


def test_a_kill_during_the_final_logging_completes_it_without_training_again(project):
    good = set_params(project, **{"tracking.log_model": True})
    try:
        killed_train(project, "b1", "tracking.Tracker", "log_model", before="True")
    finally:
        (project / "params.yaml").write_text(good)
    state = torch.load(project / "models_b1/last.pt", weights_only=True)
    assert state["progress"]["finished"] and not state["progress"]["finalized"]
    history = (project / "reports/b1.csv").read_text()
    set_params(project, **{"tracking.log_model": True})
    try:
        out = train(project, "b1").stdout
    finally:
        (project / "params.yaml").write_text(good)
    assert "completing its final logging" in out and "epoch 1/" not in out
    assert (project / "reports/b1.csv").read_text() == history
    run_id = read_json(project / "reports/b1.json")["mlflow_run_id"]
    r = store(project).get_run(run_id)
    assert r.info.status == "FINISHED" and "checkpoints" in {a.path for a in store(project).list_artifacts(run_id)}
    (logged,) = store(project).search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert logged.status == LoggedModelStatus.READY
    assert len(store(project).search_model_versions(f"run_id = '{run_id}'")) == 1
    assert sorted(m.step for m in store(project).get_metric_history(run_id, "train_loss")) == list(range(1, EPOCHS + 1))
    assert torch.load(project / "models_b1/last.pt", weights_only=True)["progress"]["finalized"]


def test_a_kill_between_the_final_logging_and_the_final_state_leaves_no_run_running(project):
    # after the run's last write, while the system metrics stop and the run ends
    killed_train(project, "end", "tracking.Tracker", "finish", before="True")
    run_id = torch.load(project / "models_end/last.pt", weights_only=True)["progress"]["run_id"]
    # the moment `last.pt` is saved final
    killed_train(project, "fin", "sink", "save_atomic", after="args[0].get('progress', {}).get('finalized')")
    state = torch.load(project / "models_fin/last.pt", weights_only=True)
    assert state["progress"]["finalized"] and not (project / "reports/fin.json").exists()
    assert store(project).get_run(state["progress"]["run_id"]).info.status == "FINISHED"  # ended before it
    for tag, rid in (("end", run_id), ("fin", state["progress"]["run_id"])):
        train(project, tag)
        assert read_json(project / f"reports/{tag}.json")["mlflow_run_id"] == rid
        assert store(project).get_run(rid).info.status == "FINISHED", tag
        assert [m.step for m in store(project).get_metric_history(rid, "stopped_epoch")] == [EPOCHS], tag


def test_kills_while_the_model_is_logged_or_registered_leave_one_model_and_one_version(project):
    good = set_params(project, **{"tracking.log_model": True})
    try:
        # the LoggedModel exists (PENDING), its files do not
        killed_train(project, "m1", "__import__('mlflow.pytorch').pytorch", "save_model", before="True")
        killed_train(project, "m1", "registry", "register", before="True")  # logged, not registered
        killed_train(project, "m1", "tracking.Tracker", "log_model", after="True")  # registered, not finalized
        train(project, "m1")
    finally:
        (project / "params.yaml").write_text(good)
    run_id = read_json(project / "reports/m1.json")["mlflow_run_id"]
    c = store(project)
    models = c.search_logged_models([c.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    (version,) = c.search_model_versions(f"name = 'cifar-rounds-resnet18' AND run_id = '{run_id}'")
    ready = [m.model_id for m in models if m.status == LoggedModelStatus.READY]
    assert ready == [version.source.removeprefix("models:/")]
    assert [m.status for m in models if m.model_id not in ready] == [LoggedModelStatus.FAILED]  # the interrupted upload
    assert c.get_run(run_id).info.status == "FINISHED"


def test_deleted_derived_files_are_rebuilt_from_the_state_without_training(project, tmp_path):
    leases = tmp_path / "leases"
    train(project, "b6", CIFAR_ROUNDS_LEASE_DIR=str(leases))
    kept = {p: (project / p).read_bytes() for p in ("reports/b6.csv", "reports/b6.json", "models_b6/best.pt")}
    runs_before = len(store(project).search_runs([store(project).get_experiment_by_name("cifar-rounds").experiment_id]))
    for p in kept:
        (project / p).unlink()
    # another CPU training runs during the rebuild: the summary still tells where the run trained
    with open(leases / "cpu0.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        out = train(project, "b6", CIFAR_ROUNDS_LEASE_DIR=str(leases)).stdout
    assert "rebuilding its outputs without training" in out and "epoch 1/" not in out
    assert (project / "reports/b6.csv").read_bytes() == kept["reports/b6.csv"]
    assert json.loads((project / "reports/b6.json").read_bytes()) == json.loads(kept["reports/b6.json"])
    rebuilt = torch.load(project / "models_b6/best.pt", weights_only=True)
    original = torch.load(__import__("io").BytesIO(kept["models_b6/best.pt"]), weights_only=True)
    assert rebuilt["epoch"] == original["epoch"]
    assert all(torch.equal(rebuilt["model"][k], original["model"][k]) for k in original["model"])
    runs_after = store(project).search_runs([store(project).get_experiment_by_name("cifar-rounds").experiment_id])
    assert len(runs_after) == runs_before


def test_a_fresh_start_ends_the_replaced_run_killed_with_the_reason(project):
    kill_after_epoch(project, "b3", 1)
    old = torch.load(project / "models_b3/last.pt", weights_only=True)["progress"]["run_id"]
    assert store(project).get_run(old).info.status == "RUNNING"
    good = set_params(project, **{"train.lr_gamma": 0.5})
    try:
        out = train(project, "b3").stdout
    finally:
        (project / "params.yaml").write_text(good)
    assert "starting fresh" in out
    r = store(project).get_run(old)
    assert r.info.status == "KILLED" and r.data.tags["cifar_rounds.end_reason"].startswith("superseded")


def test_a_changed_experiment_name_continues_training_in_a_new_run_there(project):
    kill_after_epoch(project, "b7", 1)
    old = torch.load(project / "models_b7/last.pt", weights_only=True)["progress"]["run_id"]
    good = set_params(project, **{"tracking.experiment_name": "renamed", "tracking.run_name": "moved"})
    try:
        out = train(project, "b7").stdout
    finally:
        (project / "params.yaml").write_text(good)
    assert "resuming from models_b7/last.pt after epoch 1" in out and "epoch 1/" not in out
    new = read_json(project / "reports/b7.json")["mlflow_run_id"]
    r = store(project).get_run(new)
    assert r.info.experiment_id == store(project).get_experiment_by_name("renamed").experiment_id
    assert r.info.run_name == "moved" and r.info.status == "FINISHED"
    assert sorted(m.step for m in store(project).get_metric_history(new, "train_loss")) == list(range(1, EPOCHS + 1))
    assert store(project).get_run(old).info.status == "KILLED"


def test_changed_diagnostics_continue_with_the_new_settings_and_are_recorded(project):
    kill_after_epoch(project, "diag", 1)
    good = set_params(project, **{"diagnostics.noise_scale": False})
    try:
        out = train(project, "diag").stdout
    finally:
        (project / "params.yaml").write_text(good)
    assert "diagnostics changed since epoch 1; continuing with the new values" in out
    header, *rows = (project / "reports/diag.csv").read_text().splitlines()
    noise = [row.split(",")[header.split(",").index("noise_scale")] for row in rows]
    assert noise[0] != "" and noise[1:] == [""] * (EPOCHS - 1)  # no frozen value once the probe is off
    run_id = read_json(project / "reports/diag.json")["mlflow_run_id"]
    r = store(project).get_run(run_id)
    assert r.data.tags["changed_after_epoch.diagnostics"] == "1"
    assert "params/from-epoch-002.yaml" in {a.path for a in store(project).list_artifacts(run_id, "params")}


def test_a_resplit_with_the_same_params_but_other_content_starts_fresh(project, tmp_path):
    kill_after_epoch(project, "resplit", 1)
    split = project / "data/split.npz"
    original = split.read_bytes()
    arrays = dict(__import__("numpy").load(split))
    arrays["train_labels"] = arrays["train_labels"][::-1].copy()  # same shapes and params, other content
    try:
        with open(split, "wb") as f:
            __import__("numpy").savez(f, **arrays)
        out = train(project, "resplit").stdout
    finally:
        split.write_bytes(original)
    assert "starting fresh" in out and "epoch 1/" in out


def test_a_second_trainer_on_the_same_models_folder_is_refused(project):
    with FileLock(str(project / ".models_lock.train.lock")):
        result = train(project, "lock", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "models_lock: another training process is writing here" in result.stderr


def test_temporary_files_of_two_writers_never_collide(tmp_path):
    target = tmp_path / "last.pt"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("first")
        b.write_text("second")
    assert target.read_text() == "first"  # the outer block renames last; either is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_locked_store_is_waited_for_and_training_finishes(project):
    """Another process holds an exclusive sqlite lock for longer than MLflow's own 20 s busy timeout."""
    locked, released = threading.Event(), threading.Event()

    def hold_lock():
        con = sqlite3.connect(project / "mlflow.db", isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        released.wait(timeout=60)
        con.execute("ROLLBACK")
        con.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    threading.Timer(30, released.set).start()
    try:
        result = train(project, "busy")
    finally:
        released.set()
        holder.join()
    assert "the MLflow store is busy" in result.stdout and result.stdout.count("store is busy") == 1
    run_id = read_json(project / "reports/busy.json")["mlflow_run_id"]
    assert store(project).get_run(run_id).info.status == "FINISHED"


def test_a_store_that_stays_locked_past_the_bound_is_one_line_and_the_checkpoint_is_kept(project):
    kill_after_epoch(project, "bound", 1)
    good = set_params(project, **{"tracking.store_patience_s": 3})
    con = sqlite3.connect(project / "mlflow.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        result = train(project, "bound", check=False)
    finally:
        con.execute("ROLLBACK")
        con.close()
        (project / "params.yaml").write_text(good)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "stayed unavailable for 3 s" in result.stderr and "checkpoint is safe" in result.stderr
    assert torch.load(project / "models_bound/last.pt", weights_only=True)["progress"]["epoch"] == 1
    out = train(project, "bound").stdout  # the next run resumes and ends the run correctly
    assert "resuming from models_bound/last.pt after epoch 1" in out
    assert store(project).get_run(read_json(project / "reports/bound.json")["mlflow_run_id"]).info.status == "FINISHED"


def test_a_dead_tracking_server_fails_in_seconds_naming_the_uri(project):
    start = time.monotonic()
    result = train(project, "dead", check=False, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "MLFLOW_TRACKING_URI: the MLflow server http://127.0.0.1:9 is not reachable" in result.stderr
    assert time.monotonic() - start < 60  # not MLflow's minutes of retries
    assert not (project / "models_dead" / "last.pt").exists()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 40, b"SQLite format 3\x00" + b"\x00" * 50],
    ids=["garbage", "truncated"],
)
def test_a_broken_store_file_is_one_line_naming_it(tmp_path, small_archive, content):
    project = make_project(tmp_path / "p", small_archive, **{**SMALL, "train.num_epochs": 1, "train.lr_milestones": []})
    run(["dvc", "repro", "split"], project)
    (project / "mlflow.db").write_bytes(content)
    result = train(project, "broken", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "mlflow.db: not a usable MLflow store" in result.stderr


def test_a_copied_repository_writes_only_inside_itself(tmp_path, small_archive):
    original = make_project(
        tmp_path / "a", small_archive, **{**SMALL, "train.num_epochs": 1, "train.lr_milestones": []}
    )
    run(["dvc", "repro"], original)
    copy = tmp_path / "b"
    shutil.copytree(original, copy, symlinks=True)
    shutil.rmtree(original)  # moved: the old path is gone
    set_params(copy, **{"train.lr_gamma": 0.5})
    out = run(["dvc", "repro"], copy).stdout
    assert "the repository moved" in out
    client = store(copy)
    runs = client.search_runs([client.get_experiment_by_name("cifar-rounds").experiment_id])
    assert len(runs) == 2 and all(r.info.artifact_uri.startswith(f"file://{copy}/mlartifacts/") for r in runs)
    assert not original.exists()


def test_sigterm_during_training_is_one_line_and_the_run_ends_killed(project):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_rounds.stages.train", *train_args("term")],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (project / "models_term/last.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1 and err.startswith("interrupted by signal 15")
    state = torch.load(project / "models_term/last.pt", weights_only=True)
    assert store(project).get_run(state["progress"]["run_id"]).info.status == "KILLED"


def evaluate(project, tag: str, summary: str) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "cifar_rounds.stages.evaluate",
            "--split",
            "data/split.npz",
            "--models",
            f"models_{tag}",
            "--summary",
            summary,
            "--metrics",
            f"reports/{tag}-metrics.json",
            "--predictions",
            f"reports/{tag}-predictions.csv",
            "--confusion-png",
            f"reports/{tag}.png",
            "--conditions",
            f"reports/{tag}-conditions.json",
        ],
        project,
        check=False,
    )


@pytest.mark.parametrize(
    "content", ["", "{not json", "[1, 2]", "{}"], ids=["empty", "garbage", "not-an-object", "no-keys"]
)
def test_evaluate_on_a_broken_summary_is_one_line_naming_it(project, content):
    (project / "reports/broken-summary.json").write_text(content)
    result = evaluate(project, "b6", "reports/broken-summary.json")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "reports/broken-summary.json" in result.stderr and "rerun the train" in result.stderr


def test_evaluate_on_a_checkpoint_of_another_width_is_one_line_naming_the_field(project):
    if not (project / "models_b6/best.pt").exists():
        train(project, "b6")
    good = set_params(project, **{"model.width": 16})
    try:
        result = evaluate(project, "b6", "reports/b6.json")
    finally:
        (project / "params.yaml").write_text(good)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "made at model.width 8, but params.yaml says 16" in result.stderr


def test_train_on_a_corrupt_split_is_one_line(project):
    (project / "data/garbage.npz").write_bytes(b"PK\x03\x04 this is not a split")
    result = run(
        [
            sys.executable,
            "-m",
            "cifar_rounds.stages.train",
            "--split",
            "data/garbage.npz",
            "--models",
            "models_g",
            "--history",
            "reports/g.csv",
            "--summary",
            "reports/g.json",
        ],
        project,
        check=False,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "data/garbage.npz: not a readable split" in result.stderr
