"""The real pipeline under `dvc repro` in a temporary git repository, read back through DVC and MLflow.

The tests in this module share one project and run in order.
"""

import csv
import hashlib
import json
import math
import re
import sys
import urllib.request
from contextlib import contextmanager

import mlflow.pytorch
import pytest
import torch
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifar_rounds.core.params import load_params
from cifar_rounds.tracking.store import process_store
from cifar_rounds.training.checkpoint import load_weights
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import amp_dtype

from helpers import free_port, make_project, read_json, run, serving

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture(scope="module")
def project(tmp_path_factory, archive):
    path = make_project(
        tmp_path_factory.mktemp("pipeline"),
        archive,
        **{"train.num_epochs": EPOCHS, "tracking.system_metrics_interval_s": 1},
    )
    result = run(["dvc", "repro"], path)
    (path / "repro.log").write_text(result.stdout + result.stderr)
    return path


def test_no_warnings_reach_the_user(project):
    log = (project / "repro.log").read_text()
    assert "Warning" not in log, log[-3000:]


def test_the_log_shows_after_epoch_1_its_time_and_when_the_training_ends(project):
    """stdout here is a file, not a terminal: no progress bar, so the line is the only estimate a log gets."""
    lines = (project / "repro.log").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"epoch 1/{EPOCHS} "))
    assert re.fullmatch(
        rf"train: epoch 1 took \S+ \S+; {EPOCHS - 1} epochs to go: about \S+ \S+ "
        r"\(ends about \d{4}-\d\d-\d\d \d\d:\d\d UTC\)",
        lines[first + 1],
    ), lines[first : first + 2]
    assert sum(line.startswith("train: epoch ") for line in lines) == 1  # once, after this process's first epoch


def client(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project}/mlflow.db")


def runs(project):
    c = client(project)
    return c.search_runs([c.get_experiment_by_name("cifar-rounds").experiment_id])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_metrics_reported_by_dvc(project):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    metrics = shown[""]["data"]["metrics.json"]["data"]
    for split in ("test", "val", "train"):
        assert 0 <= metrics[f"{split}_accuracy"] <= 1 and metrics[f"{split}_loss"] > 0
    assert metrics["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert metrics["stopped_epoch"] == EPOCHS and 1 <= metrics["best_epoch"] <= EPOCHS
    assert len(metrics["per_class_accuracy"]) == 10
    history = (project / "reports/history.csv").read_text().splitlines()
    assert len(history) == EPOCHS + 1 and history[0].startswith("epoch,learning_rate")
    assert len((project / "reports/test_predictions.csv").read_text().splitlines()) == 401
    assert (project / "reports/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_run_has_params_tags_metrics_and_artifacts(project):
    (r,) = runs(project)
    assert r.info.status == "FINISHED" and r.info.run_name == "workspace"
    params = load_params(project / "params.yaml")
    assert r.data.params == {k: str(v) for k, v in params.flat().items()}
    assert {"git_commit", "device", "torch_version", "params_digest"} <= r.data.tags.keys()
    assert r.data.tags["params_digest"] == params.digest()
    # where it ran on the machine: a leased CPU place (training/lease.py), in the tags and the summary
    summary = read_json(project / "reports/train_summary.json")
    assert r.data.tags["device_index"] == summary["device_index"] == "cpu"
    assert r.data.tags["device_slots"].endswith("CPU training(s) at start")
    resolved = amp_dtype(params.train.precision, torch.device("cpu"))
    assert r.data.tags["precision"] == ("bf16" if resolved is torch.bfloat16 else "fp32")
    metrics = read_json(project / "metrics.json")
    assert metrics["mlflow_run_id"] == r.info.run_id
    conditions = read_json(project / "reports/run_conditions.json")  # for the round report; not among the metrics
    assert (conditions["device"], conditions["precision"]) == ("cpu", r.data.tags["precision"])
    assert "device" not in metrics and conditions["eval_precision"] == "fp32"
    c = client(project)
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "train_val_accuracy_gap",
        "epoch_time_s",
        "images_per_s",
        "peak_memory_mb",
        "grad_norm_mean",
        "grad_norm/layer1.0",
    ):
        history = c.get_metric_history(r.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert all(math.isfinite(m.value) for m in history)
    assert all(m.value > 0 for m in c.get_metric_history(r.info.run_id, "grad_norm_max"))
    assert all(m.value > 0 for m in c.get_metric_history(r.info.run_id, "peak_memory_mb"))
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert c.get_metric_history(r.info.run_id, key), key  # MLflow's system metrics, sampled each second
    assert r.data.metrics["test_accuracy"] == read_json(project / "metrics.json")["test_accuracy"]
    names = {a.path for a in c.list_artifacts(r.info.run_id, "checkpoints")}
    best = read_json(project / "metrics.json")["best_epoch"]
    assert names == {f"checkpoints/best-epoch-{best:03d}.pt", f"checkpoints/last-epoch-{EPOCHS:03d}.pt"}
    assert "evaluation/confusion_matrix.png" in {a.path for a in c.list_artifacts(r.info.run_id, "evaluation")}
    assert r.info.artifact_uri.startswith(f"file://{project}/mlartifacts/")


def checkpoint_model(project) -> torch.nn.Module:
    width = load_params(project / "params.yaml").model.width
    net = build_model(width, 10, torch.device("cpu"), torch.contiguous_format)
    load_weights(project / "models/best.pt", net, width)
    return net.eval()


def test_best_model_is_a_logged_model_with_the_evaluation_and_one_registered_version(project):
    (r,) = runs(project)
    c = client(project)
    (logged,) = c.search_logged_models([r.info.experiment_id])
    assert logged.source_run_id == r.info.run_id and logged.status == LoggedModelStatus.READY
    assert logged.artifact_location.startswith(f"file://{project}/mlartifacts/")
    assert [o.model_id for o in c.get_run(r.info.run_id).outputs.model_outputs] == [logged.model_id]
    metrics = read_json(project / "metrics.json")
    assert {m.key: m.value for m in logged.metrics}["test_accuracy"] == metrics["test_accuracy"]
    (version,) = c.search_model_versions("name = 'cifar-rounds-resnet18'")
    assert version.run_id == r.info.run_id and version.source == f"models:/{logged.model_id}"
    assert version.tags == {
        "round": "workspace",
        "seed": "0",
        "dvc_exp_name": "",
        "git_commit": r.data.tags["git_commit"],
    }
    batch = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = checkpoint_model(project)(batch)
        with process_store(c.tracking_uri):
            for uri in (f"models:/{logged.model_id}", f"models:/cifar-rounds-resnet18/{version.version}"):
                assert torch.allclose(mlflow.pytorch.load_model(uri)(batch), expected, atol=1e-5), uri


@contextmanager
def model_server(project, uri: str):
    """`mlflow models serve` as a real process; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        url.rsplit(":", 1)[1],
        "-w",
        "1",
    ]
    with serving(cmd, project, f"{url}/ping", 180, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db"):
        yield url


def test_the_champion_answers_rest_predictions_equal_to_the_checkpoints(project):
    c = client(project)
    (version,) = c.search_model_versions("name = 'cifar-rounds-resnet18'")
    c.set_registered_model_alias("cifar-rounds-resnet18", "champion", version.version)  # what a report would do
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with model_server(project, "models:/cifar-rounds-resnet18@champion") as url:
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = torch.tensor(json.loads(response.read())["predictions"])
    with torch.no_grad():
        assert torch.allclose(answer, checkpoint_model(project)(batch), atol=1e-4)


def test_noise_scale_every_epoch_and_sharpness_at_milestones_and_the_end(project):
    rows = list(csv.DictReader(open(project / "reports/history.csv")))
    assert all(
        math.isfinite(float(r["noise_scale"])) for r in rows[1:]
    )  # NaN only while the EMA of |G|^2 is not positive
    (r,) = runs(project)
    for key in ("noise_g_sq", "noise_trace_sigma"):
        values = client(project).get_metric_history(r.info.run_id, key)
        assert sorted(m.step for m in values) == list(range(1, EPOCHS + 1)) and all(
            math.isfinite(m.value) for m in values
        )
    assert all(m.value > 0 for m in client(project).get_metric_history(r.info.run_id, "noise_trace_sigma"))
    measured = [int(r["epoch"]) for r in rows if r["lambda_max"]]
    milestones = load_params(project / "params.yaml").train.lr_milestones
    assert measured == sorted(set(milestones) | {EPOCHS})
    for row in rows:
        if row["lambda_max"]:
            tp = load_params(project / "params.yaml").train  # heavy-ball SGD: 2(1 + beta)/lr, less weight decay
            assert float(row["stability_bound"]) == pytest.approx(
                2 * (1 + tp.momentum) / float(row["learning_rate"]) - tp.weight_decay
            )
            assert float(row["hessian_trace"]) != 0
    lam = client(project).get_metric_history(r.info.run_id, "lambda_max")
    assert sorted(m.step for m in lam) == measured


def test_second_repro_runs_nothing(project):
    before = len(runs(project))
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in out
    assert len(runs(project)) == before


def test_code_that_decides_no_output_leaves_the_pipeline_clean_and_an_upgrade_keeps_its_rounds(project):
    run(["dvc", "repro"], project)  # up to date, whatever ran before
    up_to_date = "Data and pipelines are up to date."
    run([sys.executable, "-m", "compileall", "-q", "src"], project)  # bytecode beside every module
    assert up_to_date in run(["dvc", "status"], project).stdout
    tracking = project / "src/cifar_rounds/tracking/run.py"
    tracking.write_text(tracking.read_text() + "\n# a log line changed\n")
    assert up_to_date in run(["dvc", "status"], project).stdout
    engine = project / "src/cifar_rounds/training/engine.py"
    engine.write_text(engine.read_text() + "\n# an upgrade that computes the same\n")
    status = run(["dvc", "status"], project).stdout
    assert "src/cifar_rounds/training" in status and "train:" in status and "evaluate:" in status
    # README, "Upgrading": after checking that the change computes the same, keep the trained round
    run(["dvc", "commit", "-f"], project)
    assert up_to_date in run(["dvc", "status"], project).stdout
    assert "Running stage" not in run(["dvc", "repro"], project).stdout


def test_bad_params_stop_before_any_work_and_keep_outputs(project):
    good = (project / "params.yaml").read_text()
    kept = {p: digest(project / p) for p in ("models/best.pt", "models/last.pt", "metrics.json", "reports/history.csv")}
    raw = yaml.safe_load(good)
    raw["train"]["learning_rate"] = -0.1
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        result = run(["dvc", "repro"], project, check=False)
    finally:
        (project / "params.yaml").write_text(good)
    assert result.returncode != 0
    assert "error: params.yaml: train.learning_rate: Input should be greater than 0 (got -0.1)" in result.stderr
    assert {p: digest(project / p) for p in kept} == kept
    assert [r.info.status for r in runs(project)] == ["FINISHED"]


def test_changing_a_train_param_reruns_train_and_evaluate_only(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["lr_gamma"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'download'" not in out and "Running stage 'split'" not in out
    # the old checkpoint belonged to other params: a fresh run, not a resume
    assert "other data, model or train params; starting fresh" in out
    assert sorted(r.info.status for r in runs(project)) == ["FINISHED", "FINISHED"]


def dataset_inputs(project, run_id: str) -> set[tuple[str, str, str]]:
    found = client(project).get_run(run_id).inputs.dataset_inputs
    return {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in found}


def split_md5(project) -> str:
    """The hash DVC records for the split file."""
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["split"]["outs"]
    return next(o["md5"] for o in outs if o["path"] == "data/split.npz")


def test_runs_on_one_split_share_its_dataset_and_a_re_split_is_a_new_one(project):
    first, second = (r.info.run_id for r in runs(project))  # two trainings on one split by now
    md5 = split_md5(project)
    expected = {("cifar10-train", md5, "training"), ("cifar10-val", md5, "validation"), ("cifar10-test", md5, "test")}
    assert dataset_inputs(project, first) == dataset_inputs(project, second) == expected
    (train_input,) = [
        i for i in client(project).get_run(first).inputs.dataset_inputs if i.dataset.name == "cifar10-train"
    ]
    params = load_params(project / "params.yaml")
    assert json.loads(train_input.dataset.source) == {"uri": params.data.url}
    assert json.loads(train_input.dataset.profile) == {"num_rows": 1500 - params.data.val_size}
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    run(["dvc", "repro"], project)
    assert split_md5(project) != md5
    newest = max(runs(project), key=lambda r: r.info.start_time).info.run_id
    assert {digest for _, digest, _ in dataset_inputs(project, newest)} == {split_md5(project)}
