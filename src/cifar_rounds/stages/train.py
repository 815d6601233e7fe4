"""Stage `train`: ResNet-18 with SGD, MultiStepLR and early stopping, from params.yaml.

Every epoch goes, atomically and in this order, to the full training state
(`last.pt`, enough to resume bit for bit), the best weights (`best.pt`), the
per-epoch history (a DVC plot) and MLflow (params, per-epoch metrics, gradient
norms); at the end, a summary. See `training.trainer` for the epoch, `sink` for the outputs,
`checkpoint` for the state and `runtime` for the device.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.files import file_md5
from cifar_rounds.core.inputs import folder, input_file, output_file
from cifar_rounds.core.names import TRAINER_LOCK
from cifar_rounds.core.params import Params, load_params
from cifar_rounds.data.dataset import Split
from cifar_rounds.tracking.lifecycle import system_metrics
from cifar_rounds.tracking.run import dataset_inputs
from cifar_rounds.tracking.store import repo_root, tracking_uri
from cifar_rounds.training.checkpoint import (
    Outputs,
    Progress,
    best_weights,
    find_resume,
    restore,
    run_identity,
    training_state,
)
from cifar_rounds.training.diagnostics import NoiseScale
from cifar_rounds.training.distributed import World, close_world, from_main_rank, gather, init_world
from cifar_rounds.training.engine import EarlyStopping
from cifar_rounds.training.lease import Lease, share_cores, take_lease
from cifar_rounds.training.runtime import configure_cpu, run_conditions, select_device
from cifar_rounds.training.sink import NullSink, RunSink
from cifar_rounds.training.trainer import build_trainer, diagnose, run_epoch, sharpness_due
from cifar_rounds.training.trial import STATE_TAG, NoTrial, open_trial


def fit(
    params: Params,
    split: Split,
    split_digest: str,
    out: Outputs,
    device: torch.device,
    world: World = World(),
    lease: Lease | None = None,
) -> dict:
    """Train to the end or early stop, checkpointing every epoch; returns the summary.

    Under torchrun every rank runs this; rank 0's sink writes files and logs.
    """
    train, identity = params.train, run_identity(params, split_digest)
    t = build_trainer(params, split, device, world)
    resume = find_resume(out.last, identity)
    progress = restore(resume.state, t.net, t.optimizer, t.scheduler, t.generator) if resume.state else Progress()
    stopper = (
        EarlyStopping(**progress.stopper)
        if progress.stopper
        else EarlyStopping(train.monitor, train.patience, train.min_delta)
    )
    # the averages continue; the decay is today's diagnostics.noise_ema (a change is recorded by the sink)
    noise = NoiseScale(**{**progress.noise, "decay": params.diagnostics.noise_ema})
    progress.conditions = progress.conditions or run_conditions(train.precision, params.model.width, device)
    datasets = dataset_inputs(params.data.url, split_digest, split.sizes)
    sink = (
        RunSink.open(params, out, len(split.label_names), progress.conditions, progress, resume, datasets)
        if world.is_main
        else NullSink()
    )
    reports = world.is_main and not progress.finalized  # rank 0 reports to the trial
    trial = open_trial(params.sweep, params.tracking.store_patience_s) if reports else NoTrial()
    sink.tag(trial.tags())
    sink.tag(rank_nodes(world))
    if not progress.finalized:  # a rebuild reports where the run trained, not where it was rebuilt
        progress.placement = lease.conditions() if lease is not None else {}
    sink.tag(progress.placement)
    state = resume.state
    with sink.running(), node_system_metrics(params, world, from_main_rank(sink.run_id, world)):
        while not progress.finished:
            share_cores(lease)  # trainings that started or ended since change this one's share
            epoch = progress.epoch + 1
            record, result, samples = run_epoch(t, epoch, train)
            improved = stopper.update(record[train.monitor], epoch)
            # a pruned trial stops as an early stop does; rank 0 decides for every rank
            progress.pruned = bool(from_main_rank(trial.report(epoch, record), world))
            progress.finished = stopper.should_stop or progress.pruned or epoch == train.num_epochs
            record.update(
                diagnose(
                    t, params, samples, noise, record["learning_rate"], sharpness_due(epoch, progress.finished, params)
                )
            )
            progress.epoch, progress.stopper, progress.noise = epoch, asdict(stopper), asdict(noise)
            progress.history.append(record)
            progress.last_grad_norm_steps = step_series(
                result.step_grad_norms, epoch, params.tracking.grad_norm_interval
            )
            state = training_state(t.net, t.optimizer, t.scheduler, t.generator, progress, identity)
            best = best_weights(t.net.state_dict(), epoch, params.model.width) if improved else None
            sink.epoch(progress, record, state, best)
        summary = {
            "best_epoch": stopper.best_epoch,
            "stopped_epoch": progress.epoch,
            "early_stopped": stopper.should_stop,
            "pruned": progress.pruned,
            "mlflow_run_id": progress.run_id,
            **progress.conditions,
            **progress.placement,
        }
        trial_state = trial.finish(progress.pruned, stopper.best_epoch)
        if trial_state:
            sink.tag({STATE_TAG: trial_state})
        sink.finish(progress, state, summary)
    sink.finalize(progress, state, summary)  # the run has ended (and its system metrics with it)
    return summary


def rank_nodes(world: World) -> dict[str, str]:
    """Tags naming each rank's node, under torchrun; none for one process."""
    if world.size == 1:
        return {}
    return {f"node.rank{rank}": name for rank, name in enumerate(gather(world.node_name, world))}


def node_system_metrics(params: Params, world: World, run_id: str | None) -> AbstractContextManager:
    """System metrics of each machine once, by its first rank (they are the machine's, not the process's).

    Under torchrun the keys carry the node's name; one process keeps MLflow's plain `system/...`.
    """
    if world.local_rank != 0:
        return nullcontext()
    uri = tracking_uri(params, repo_root())
    if not world.is_main and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # another machine's local file: opening it here would create an empty store
        print(f"train: {world.node_name} does not see the store {uri}; its system metrics are not sampled")
        return nullcontext()
    return system_metrics(
        uri, run_id, params.tracking.system_metrics_interval_s, world.node_name if world.size > 1 else None
    )


def step_series(step_norms: list[float], epoch: int, interval: int) -> dict[int, float]:
    """The per-step gradient norms at global steps divisible by `interval`."""
    first = (epoch - 1) * len(step_norms)
    return {first + i + 1: v for i, v in enumerate(step_norms) if (first + i + 1) % interval == 0}


def one_trainer(models: Path) -> FileLock:
    """Held while training: a second trainer on the same models folder is refused, not raced."""
    # beside the folder, not in it: the folder is a DVC output
    lock = FileLock(str(models.parent / f".{models.name}{TRAINER_LOCK}"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StageError(
            f"{models}: another training process is writing here; wait for it or use another --models folder"
        ) from None
    return lock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="split stage's .npz")
    parser.add_argument("--models", type=Path, required=True, help="folder for best.pt and last.pt")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch history CSV (DVC plot)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: best/stopped epoch, MLflow run id")
    args = parser.parse_args()
    input_file(args.split, "the split stage's .npz")
    folder(args.models, "the folder for best.pt and last.pt")
    output_file(args.history, "the per-epoch history CSV")
    output_file(args.summary, "the summary JSON")
    params = load_params()
    chosen = select_device(params.train.device)
    lease = take_lease(chosen.type == "cuda", torch.cuda.device_count())  # before any work: it may wait
    if lease is not None and lease.device == "cuda":
        chosen = torch.device("cuda", lease.index)
        torch.cuda.set_device(chosen)
    configure_cpu(chosen)  # before any parallel work
    share_cores(lease)
    world = init_world(chosen.type == "cuda")
    lock = one_trainer(args.models) if world.is_main else None
    try:
        device = chosen if lease is not None else select_device(params.train.device, world.local_rank)
        split = Split.load(args.split)
        out = Outputs(args.models, args.history, args.summary)
        summary = fit(params, split, file_md5(args.split), out, device, world, lease)
    finally:
        close_world(world)
        if lock is not None:
            lock.release()
    if world.is_main:
        print(f"train: best epoch {summary['best_epoch']}, stopped after {summary['stopped_epoch']}")


if __name__ == "__main__":
    run_stage(main)
