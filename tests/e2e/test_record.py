"""The MLflow record stays true to what happened: kills anywhere in the final logging, reruns, a moved copy.

The kill sweeps fork the real stages from one driver process (its imports paid once) and
SIGKILL each child after its k-th write to the store, for every k; the rerun then completes
the record, which is checked run by run.
"""

import json
import math
import re
import shutil
import signal
import sys
import textwrap
import urllib.request
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifar_rounds.data.augment import eval_batches
from cifar_rounds.data.dataset import Split
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.training.pace import SHORT_RUNS

from helpers import free_port, make_project, read_json, repository_copy, run, serving

MODEL = "cifar-rounds-resnet18"
TINY = {
    "data.val_size": 50,
    "model.width": 8,
    "train.batch_size": 50,
    "train.num_epochs": 1,
    "train.lr_milestones": [],
    "train.patience": 1,
    "train.precision": "bf16",  # trained in bf16, served in fp32: what evaluate must score is the latter
    "diagnostics.noise_scale": False,
    "diagnostics.sharpness": False,
}


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.tar.gz"
    return path, write_archive(path, train_size=300, test_size=100, seed=3)


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_archive):
    path = make_project(tmp_path_factory.mktemp("record"), small_archive, **TINY)
    run(["dvc", "repro"], path)
    return path


def store(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project}/mlflow.db")


def stage_args(stage: str, tag: str) -> list[str]:
    """The stage on its own files, named by `tag`: train a models folder, evaluate what that training left."""
    if stage == "train":
        return [
            *("--split", "data/split.npz", "--models", f"models_{tag}"),
            *("--history", f"reports/{tag}.csv", "--summary", f"reports/{tag}.json"),
        ]
    return [
        *("--split", "data/split.npz", "--models", f"models_{tag}", "--summary", f"reports/{tag}.json"),
        *("--metrics", f"reports/{tag}-metrics.json", "--conditions", f"reports/{tag}-conditions.json"),
        *("--predictions", f"reports/{tag}-predictions.csv", "--confusion-png", f"reports/{tag}.png"),
    ]


# Counts the stage's store writes (Tracker._call, reads aside: a kill after a read leaves the store
# as the write before it did) from `arm` on; a child forked with `kill_after = k` SIGKILLs itself
# after its k-th (k = 0: as soon as it is armed). Prints JSON: the writes of a whole run, then each
# kill's and each rerun's exit as (signal, code), and the seconds the sweep took.
DRIVER = """
import json, os, signal, sys, time
from cifar_rounds.core.errors import run_stage
from cifar_rounds.stages import evaluate, train
from cifar_rounds.tracking import run as tracking
from cifar_rounds.training import sink

# what the stages import or scan on first use, done once here: each forked child would pay it again (about 8 s)
import mlflow.pytorch, mlflow.store.model_registry.sqlalchemy_store, mlflow.store.tracking.sqlalchemy_store
import torch._inductor
from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches
warn_dependency_requirement_mismatches(mlflow.pytorch.get_default_pip_requirements())

stage, arm_owner, arm_name, args_of = {stage!r}, {arm_owner}, {arm_name!r}, {args_of!r}
state = {{"armed": False, "writes": 0, "kill_after": None}}

def kill_if_due():
    if state["armed"] and state["writes"] == state["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)

write = tracking.Tracker._call
def counted(self, what, call):
    result = write(self, what, call)
    if not what.startswith("reading"):
        state["writes"] += state["armed"]
        kill_if_due()
    return result
tracking.Tracker._call = counted
arm = getattr(arm_owner, arm_name)
def armed(*args, **kwargs):
    state["armed"] = True
    kill_if_due()
    return arm(*args, **kwargs)
setattr(arm_owner, arm_name, armed)

def child(tag, kill_after=None):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        state["kill_after"], code = kill_after, 0
        sys.argv = [stage, *[a.replace("TAG", tag) for a in args_of]]
        try:
            run_stage({{"train": train, "evaluate": evaluate}}[stage].main)
        except SystemExit as stop:
            code = stop.code
        with open(f"{{tag}}.writes", "w") as f:
            f.write(str(state["writes"]))
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return [os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0, os.WEXITSTATUS(status)]

start = time.monotonic()
child("whole")
writes = int(open("whole.writes").read())
ends = {{k: [child(f"k{{k}}", k), child(f"k{{k}}")] for k in range(writes + 1)}}
print(json.dumps({{"writes": writes, "ends": ends, "seconds": time.monotonic() - start}}))
"""


def kill_sweep(project, stage: str, arm: tuple[str, str]) -> dict:
    """Every kill point of `stage` after `arm` is called, each followed by a rerun; returns the driver's JSON."""
    args = stage_args(stage, "TAG")
    code = DRIVER.format(stage=stage, arm_owner=arm[0], arm_name=arm[1], args_of=args)
    out = run([sys.executable, "-c", textwrap.dedent(code)], project).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["writes"] >= 3, result
    for k, (killed, rerun) in result["ends"].items():
        assert killed == [signal.SIGKILL, 0] and rerun == [0, 0], (k, result, out[-3000:])
    return result


def metric_steps_repeated(client: MlflowClient, run_id: str) -> dict:
    """(key, step) pairs the run holds more than one value for."""
    repeated = {}
    for key in client.get_run(run_id).data.metrics:
        counts = Counter(m.step for m in client.get_metric_history(run_id, key))
        repeated |= {(key, step): n for step, n in counts.items() if n > 1}
    return repeated


def assert_record_true(client: MlflowClient, run_id: str) -> None:
    """Ended, one READY model and one version, each metric once per step (on the run and on its model)."""
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED", run_id
    models = client.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    (ready,) = [m for m in models if m.status == LoggedModelStatus.READY]
    (version,) = client.search_model_versions(f"name = '{MODEL}' AND run_id = '{run_id}'")
    assert version.source == f"models:/{ready.model_id}"
    assert metric_steps_repeated(client, run_id) == {}
    assert [k for k, n in Counter((m.key, m.step) for m in ready.metrics or []).items() if n > 1] == []


@pytest.mark.timeout(2400)  # 38 short processes forked from one: 152 s measured alone on 2 cores
def test_a_kill_anywhere_in_the_final_logging_or_the_evaluation_is_completed_by_the_rerun(project):
    trained = kill_sweep(project, "train", ("sink.RunSink", "finish"))
    evaluated = kill_sweep(project, "evaluate", ("evaluate", "log_evaluation"))  # on the runs `trained` left
    print(f"kill sweeps: {trained['seconds']:.0f} s and {evaluated['seconds']:.0f} s")
    assert evaluated["writes"] <= trained["writes"]
    client = store(project)
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment]) if r.info.status == "RUNNING"] == []
    for k in trained["ends"]:
        run_id = read_json(project / f"reports/k{k}.json")["mlflow_run_id"]
        assert_record_true(client, run_id)
        logged = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in ("best_epoch", "train_loss")}
        assert logged == {"best_epoch": [1], "train_loss": [1]}, k
        if k in evaluated["ends"]:
            assert [m.step for m in client.get_metric_history(run_id, "test_accuracy")] == [1], k


def test_a_forced_evaluation_logs_nothing_twice(project):
    run_id = read_json(project / "metrics.json")["mlflow_run_id"]
    client = store(project)
    before = client.get_run(run_id).data.metrics
    run(["dvc", "repro", "-f", "evaluate"], project)
    assert_record_true(client, run_id)
    assert client.get_run(run_id).data.metrics == before  # the same values, and no more of them
    for key in ("best_epoch", "stopped_epoch"):  # the train stage's to log; evaluate does not repeat them
        assert len(client.get_metric_history(run_id, key)) == 1


def served_scores(project, model_id: str) -> dict[str, float]:
    """Test loss and accuracy of the logged model as `models:/` serves it (fp32 on the CPU)."""
    import mlflow.pytorch

    from cifar_rounds.tracking.store import process_store

    split = Split.load(project / "data/split.npz")
    images, labels = torch.from_numpy(split.test_images), torch.from_numpy(split.test_labels)
    with process_store(f"sqlite:///{project}/mlflow.db"):
        model = mlflow.pytorch.load_model(f"models:/{model_id}")
    losses, correct = [], []
    with torch.no_grad():
        for x, y in eval_batches(images, labels, 64):
            logits = model(x)
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            correct.append(logits.argmax(1) == y)
    return {"test_loss": torch.cat(losses).mean().item(), "test_accuracy": torch.cat(correct).float().mean().item()}


def test_the_logged_models_metrics_are_those_of_the_model_as_served(project):
    run_id = read_json(project / "metrics.json")["mlflow_run_id"]
    client = store(project)
    (logged,) = client.search_logged_models(
        [client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    recorded = {m.key: m.value for m in logged.metrics}
    served = served_scores(project, logged.model_id)
    assert recorded["test_accuracy"] == served["test_accuracy"]
    assert math.isclose(recorded["test_loss"], served["test_loss"], rel_tol=1e-5), (recorded["test_loss"], served)
    assert logged.tags["training_precision"] == "bf16" and logged.tags["eval_precision"] == "fp32"
    conditions = read_json(project / "reports/run_conditions.json")
    assert conditions["precision"] == "bf16" and conditions["eval_precision"] == "fp32"
    assert client.get_run(run_id).data.tags["precision"] == "bf16"


def test_metrics_json_holds_numbers_only_and_the_headline_says_where_the_run_is(project):
    metrics = read_json(project / "metrics.json")
    assert not {"device", "precision", "denormals", "layout"} & metrics.keys()
    assert {k for k, v in metrics.items() if not isinstance(v, (int, float, dict))} == {
        "mlflow_run_id",
        "test_set_digest",
    }  # identifiers, which `dvc metrics diff` leaves out
    out = run(["cifar-rounds", "show", "--headline"], project).stdout
    lines = out.strip().splitlines()
    assert lines[0] == (
        f"test accuracy {metrics['test_accuracy']:.2%}, validation accuracy {metrics['val_accuracy']:.2%} "
        f"(train-val gap {metrics['train_accuracy'] - metrics['val_accuracy']:+.2%})"
    )
    assert lines[1] == f"best epoch {metrics['best_epoch']}, stopped after epoch {metrics['stopped_epoch']}"
    assert lines[2] == (
        f"MLflow run {metrics['mlflow_run_id']} in experiment 'cifar-rounds': "
        f"mlflow ui --backend-store-uri sqlite:///{project}/mlflow.db"
    )
    assert lines[3] == "every metric: dvc metrics show" and len(lines) == 4


def test_a_copy_whose_original_is_gone_loads_and_serves_its_champion_after_one_command(project, tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(project, original, symlinks=True)
    run(["cifar-rounds", "relocate"], original)  # a copy of the module's project
    client = store(original)
    (version, *_) = client.search_model_versions(f"name = '{MODEL}'")
    client.set_registered_model_alias(MODEL, "champion", version.version)
    shutil.copytree(original, copy, symlinks=True)
    shutil.rmtree(original)

    out = run(["cifar-rounds", "relocate"], copy).stdout
    assert f"artifact paths now under {copy}/mlartifacts" in out
    again = run(["cifar-rounds", "relocate"], copy).stdout
    assert again.strip() == f"relocate: {copy}/mlflow.db already points into {copy}/mlartifacts"
    paths = store_paths(copy)
    assert paths and all(str(copy) in p for p in paths) and not any(str(original) in p for p in paths)

    load = f"""
import mlflow.pytorch, torch
model = mlflow.pytorch.load_model("models:/{MODEL}@champion")
print(model(torch.zeros(2, 3, 32, 32)).shape)
"""
    result = run(
        [sys.executable, "-c", textwrap.dedent(load)], tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{copy}/mlflow.db"
    )
    assert result.stdout.strip().endswith("torch.Size([2, 10])"), result.stderr[-3000:]

    # served from the copy, as `mlflow models serve` runs it
    url = f"http://127.0.0.1:{free_port()}"
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    serve += ["--env-manager", "local", "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1], "-w", "1"]
    with serving(serve, copy, f"{url}/ping", 180, MLFLOW_TRACKING_URI=f"sqlite:///{copy}/mlflow.db"):
        body = json.dumps({"inputs": torch.zeros(2, 3, 32, 32).tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert torch.tensor(json.loads(response.read())["predictions"]).shape == (2, 10)

    # and the report reads the run's evaluation from the copy's own artifacts
    run_id = read_json(copy / "metrics.json")["mlflow_run_id"]
    run([sys.executable, "-m", "cifar_rounds.analysis.report", run_id, run_id, "--out", "reports/copy.md"], copy)
    assert run_id in (copy / "reports" / "copy.md").read_text()


def store_paths(project) -> list[str]:
    """Every artifact location the store holds: experiments (Default's too), runs, models, versions."""
    import sqlite3

    con = sqlite3.connect(project / "mlflow.db")
    try:
        queries = (
            "SELECT artifact_location FROM experiments",
            "SELECT artifact_uri FROM runs",
            "SELECT artifact_location FROM logged_models",
            "SELECT storage_location FROM model_versions",
        )
        return [value for q in queries for (value,) in con.execute(q).fetchall()]
    finally:
        con.close()


def test_the_pipeline_script_ends_with_the_headline(tmp_path, small_archive):
    from cifar_rounds.cli.demo import offline_params
    from cifar_rounds.core.params import dump_params

    from helpers import repo_params

    repo = repository_copy(tmp_path / "repo")
    overrides = {**TINY, "tracking.log_model": False, "train.precision": "auto"}
    dump_params(offline_params(repo_params(), small_archive[0], small_archive[1], overrides), repo / "params.yaml")
    out = run(["scripts/pipeline.sh"], repo).stdout
    # before training on a CPU: the configured training's time here, measured, and the short runs instead
    before = out.split("Running stage 'train'")[0]
    assert re.search(r"^pipeline: no GPU here: a training step of ResNet-18 width 8, batch 50 took ", before, re.M)
    assert re.search(r"^pipeline: .*the configured 1 epoch about \S+ \S+$", before, re.M), before[-2000:]
    assert f"pipeline: a short run instead: {SHORT_RUNS[0]} (about " in before and SHORT_RUNS[1] in before
    metrics = read_json(repo / "metrics.json")
    tail = out.strip().splitlines()[-4:]
    assert tail[0].startswith(f"test accuracy {metrics['test_accuracy']:.2%}, validation accuracy")
    assert tail[2].startswith(f"MLflow run {metrics['mlflow_run_id']}") and tail[3] == "every metric: dvc metrics show"
    assert "per_class_accuracy" not in out  # not the full table
