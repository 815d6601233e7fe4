"""Real `torchrun --nproc_per_node=2` on CPU (gloo): DDP does what data parallelism must do."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from cifar_rounds.core.params import load_params
from cifar_rounds.data.augment import TrainBatches
from cifar_rounds.data.dataset import Split
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.training.engine import autocast
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import amp_dtype, memory_format
from cifar_rounds.training.trainer import build_optimizer

from helpers import env, free_port, make_project, read_json, repo_params, run

pytestmark = pytest.mark.slow


TRAIN = ["-m", "cifar_rounds.stages.train", "--split", "data/split.npz"]


def torchrun(models: str, history: str, summary: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *TRAIN,
        "--models",
        models,
        "--history",
        history,
        "--summary",
        summary,
    ]


def two_nodes(project: Path) -> None:
    """Two torchrun launchers of one rank each, as two machines would start them (static rendezvous)."""
    port = free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *TRAIN,
                "--models",
                "models",
                "--history",
                "reports/history.csv",
                "--summary",
                "reports/summary.json",
            ],
            cwd=project,
            env=env(OMP_NUM_THREADS="1"),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:  # only while it runs: a reaped PID may be another process's now
                kill_tree(launcher.pid)
    assert all(launcher.returncode == 0 for launcher in launchers), outputs


def test_one_ddp_step_over_two_nodes_equals_averaging_the_per_rank_micro_batch_gradients(tmp_path):
    archive = tmp_path / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=5)
    project = make_project(
        tmp_path / "p",
        (archive, md5),
        **{
            "data.val_size": 50,
            "train.num_epochs": 1,
            "train.lr_milestones": [],
            "train.batch_size": 128,
            "tracking.log_model": False,
            "tracking.system_metrics_interval_s": 0.2,
        },
    )
    run(["dvc", "repro", "split"], project)
    two_nodes(project)
    ddp = torch.load(project / "models/last.pt", weights_only=True)["model"]

    # each rank's node is named, and each node's machine is sampled into the one run under its name
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    found = client.get_run(read_json(project / "reports/summary.json")["mlflow_run_id"])
    nodes = [f"node{n}-{socket.gethostname()}" for n in (0, 1)]
    assert {k: v for k, v in found.data.tags.items() if k.startswith("node.")} == {
        "node.rank0": nodes[0],
        "node.rank1": nodes[1],
    }
    for node in nodes:
        assert f"system/{node}/cpu_utilization_percentage" in found.data.metrics
    assert not any(k.startswith("system/cpu") for k in found.data.metrics)  # no unnamed machine

    params = load_params(project / "params.yaml")
    split = Split.load(project / "data/split.npz")
    # torchrun gives each rank one thread; the same kernels make the comparison exact
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = one_step_of_averaged_micro_batches(params, split)
    finally:
        torch.set_num_threads(threads)
    for name, p in reference.named_parameters():
        assert torch.allclose(ddp[name], p.detach(), atol=1e-7, rtol=1e-6), name


def one_step_of_averaged_micro_batches(params, split) -> torch.nn.Module:
    torch.manual_seed(params.train.seed)
    cpu = torch.device("cpu")
    net = build_model(params.model.width, 10, cpu, memory_format(params.model.width, cpu))
    optimizer, _ = build_optimizer(net, params.train)
    batches = TrainBatches(torch.from_numpy(split.train_images), torch.from_numpy(split.train_labels), 128, True, True)
    assert len(batches) == 1  # exactly one optimizer step
    generator = torch.Generator().manual_seed(params.train.seed)
    start = generator.get_state()
    grads = []
    for rank in (0, 1):
        generator.set_state(start)  # every rank draws the same epoch and takes its own shard
        x, y = next(batches.epoch(generator, slice(rank, None, 2)))
        net.zero_grad()
        with autocast(cpu, amp_dtype(params.train.precision, cpu)):  # the precision the ranks trained in
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for p, g0, g1 in zip(net.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    optimizer.step()
    return net


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (by parent PID), found before any is killed."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass  # gone already
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process this test started and everything it started (ranks run in sessions of their own)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _train_losses(path):
    with open(path) as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def test_ddp_training_matches_single_process_logs_once_and_resumes(tmp_path, archive):
    epochs = 3
    project = make_project(
        tmp_path / "p",
        archive,
        **{
            "train.num_epochs": epochs,
            "train.lr_milestones": [2],
            "train.patience": epochs,
            "train.batch_size": 64,
            "tracking.log_model": False,
            "tracking.system_metrics_interval_s": 0.5,
        },
    )
    run(["dvc", "repro"], project)  # the single-process reference, global batch 64
    cmd = torchrun("models_ddp", "reports/ddp.csv", "reports/ddp.json")
    proc = subprocess.Popen(
        cmd, cwd=project, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    history = project / "reports/ddp.csv"
    deadline = time.time() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):  # one epoch done
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both ranks
    proc.wait()
    out = run(cmd, project).stdout
    assert out.count("resuming from models_ddp/last.pt after epoch") == 1  # rank 0 speaks for all

    single, ddp = _train_losses(project / "reports/history.csv"), _train_losses(history)
    assert len(ddp) == epochs
    # Same data, same global batch, same averaged gradient: the only difference is batch norm,
    # whose statistics come from each rank's 32 images instead of all 64. On this data that
    # moves the per-epoch mean training loss by a few per cent; 15% leaves room without
    # hiding a real error (a missing all-reduce or a wrong shard shows as 50% or more).
    for a, b in zip(single, ddp):
        assert abs(a - b) <= 0.15 * a, (single, ddp)

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cifar-rounds").experiment_id])
    assert len(runs) == 2  # the single-process run and one run for both ranks
    run_id = read_json(project / "reports/ddp.json")["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, epochs + 1))
    assert len(client.list_artifacts(run_id, "checkpoints")) == 2
    node = f"node0-{socket.gethostname()}"  # both ranks on one machine: it is sampled once, under its name
    tags = client.get_run(run_id).data.tags
    assert (tags["node.rank0"], tags["node.rank1"]) == (node, node)
    sampled = {k.split("/")[1] for k in client.get_run(run_id).data.metrics if k.startswith("system/")}
    assert sampled == {node}
    # a second sampler on the machine (rank 1) would log the same steps again
    steps = [m.step for m in client.get_metric_history(run_id, f"system/{node}/cpu_utilization_percentage")]
    assert steps and len(steps) == len(set(steps)), steps
    assert sorted(p.name for p in (project / "models_ddp").iterdir()) == ["best.pt", "last.pt"]


def test_a_divergence_on_any_rank_is_reported_at_its_first_step(monkeypatch):
    from cifar_rounds.training import trainer as loop
    from cifar_rounds.training.distributed import World
    from cifar_rounds.training.engine import EpochResult

    # rank 0 is fine; rank 1 diverged at step 3 (index 2): every rank must stop there
    ranks = [[1.0, 0.5, -1, 4.0], [2.0, 0.7, 2, 6.0]]
    monkeypatch.setattr(loop, "gather", lambda values, world: ranks)
    result = EpochResult({"train_loss": 1.0, "train_accuracy": 0.5}, [1.0] * 5, None)
    reduced, samples = loop.reduce_over_ranks(result, [(4.0, 9.0, 8, 16)], World(0, 2, 0))
    assert reduced.first_bad_step == 2
    assert reduced.metrics["train_loss"] == 1.5 and samples == [(5.0, 9.0, 8, 16)]


def test_a_node_that_does_not_see_the_local_store_samples_nothing_and_creates_no_store(tmp_path, monkeypatch, capsys):
    from cifar_rounds.core.params import with_overrides
    from cifar_rounds.stages.train import node_system_metrics
    from cifar_rounds.training.distributed import World

    monkeypatch.chdir(tmp_path)  # the repository root, where this node finds no mlflow.db
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):  # the store would be found elsewhere
        monkeypatch.delenv(name, raising=False)
    params = with_overrides(repo_params(), {"tracking.system_metrics_interval_s": 0.1})
    second_node = World(rank=1, size=2, local_rank=0, node_rank=1)
    with node_system_metrics(params, second_node, "0123456789abcdef"):
        pass
    assert capsys.readouterr().out == (
        f"train: node1-{socket.gethostname()} does not see the store "
        f"sqlite:///{tmp_path}/mlflow.db; its system metrics are not sampled\n"
    )
    assert list(tmp_path.iterdir()) == []
