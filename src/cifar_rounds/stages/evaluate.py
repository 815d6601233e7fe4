"""Stage `evaluate`: the best checkpoint on test, validation and (un-augmented) train data.

Writes the DVC metrics file (numbers only), the run conditions, per-example test
predictions (also the DVC confusion plot) and a confusion-matrix PNG, and logs them
to the training run in MLflow; the metrics also to the run's LoggedModel, when it
logged one. The model is scored as it is served: in fp32, in the default layout,
whatever precision it trained in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.figures import pyplot, save_figure
from cifar_rounds.core.files import atomic_path, read_json, write_json
from cifar_rounds.core.inputs import input_file, input_folder, output_file
from cifar_rounds.core.names import BEST_CHECKPOINT, EVALUATION_ARTIFACTS, RUN_CONDITIONS
from cifar_rounds.core.params import load_params
from cifar_rounds.data.augment import eval_batches
from cifar_rounds.data.dataset import Split
from cifar_rounds.tracking.run import Tracker
from cifar_rounds.training.checkpoint import load_weights
from cifar_rounds.training.engine import predict, scores
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import configure_cpu, select_device

EVAL_PRECISION = "fp32"  # what the logged model computes in when served: the metrics are that model's


def test_set_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Identifies the test set by content (pixels and labels), so that only like is paired with like."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def score(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray]:
    """{loss, accuracy} of a set in fp32, and its predictions."""
    x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    losses, preds = predict(model, eval_batches(x, y, batch_size), device, None)
    return scores(losses, preds, y), preds.numpy()


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]"""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray, names: list[str]) -> dict[str, float]:
    totals = confusion.sum(axis=1)
    # a class without test images has no accuracy (None in JSON), not 0%
    return {n: float(confusion[i, i] / totals[i]) if totals[i] else None for i, n in enumerate(names)}


def write_predictions(path: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "actual", "predicted"])
        writer.writerows((i, names[a], names[p]) for i, (a, p) in enumerate(zip(labels, preds)))


def plot_confusion(confusion: np.ndarray, names: list[str], path: Path, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 6))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > confusion.max() / 2 else "black",
        )
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="split stage's .npz")
    parser.add_argument("--models", type=Path, required=True, help="train stage's checkpoint folder")
    parser.add_argument("--summary", type=Path, required=True, help="train stage's summary JSON")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--predictions", type=Path, required=True, help="per-example test predictions CSV")
    parser.add_argument("--confusion-png", type=Path, required=True, help="confusion-matrix figure to write")
    parser.add_argument("--conditions", type=Path, required=True, help="JSON: the run conditions to write")
    args = parser.parse_args()
    input_file(args.split, "the split stage's .npz")
    input_folder(args.models, "the train stage's checkpoint folder")
    input_file(args.summary, "the train stage's summary JSON (rerun the train stage to write it)")
    for path, what in (
        (args.metrics, "the metrics JSON"),
        (args.predictions, "the predictions CSV"),
        (args.confusion_png, "the confusion-matrix PNG"),
        (args.conditions, "the run conditions JSON"),
    ):
        output_file(path, what)
    params = load_params()
    device = select_device(params.train.device)
    configure_cpu(device)
    torch.backends.cudnn.allow_tf32 = False  # on by default for convolutions: fp32 means fp32 here
    summary = read_summary(args.summary)
    split = Split.load(args.split)
    names = split.label_names
    model = build_model(params.model.width, len(names), device, torch.contiguous_format)  # as it is logged
    load_weights(args.models / BEST_CHECKPOINT, model, params.model.width)

    bs = params.train.eval_batch_size
    sets = {
        "test": (split.test_images, split.test_labels),
        "val": (split.val_images, split.val_labels),
        "train": (split.train_images, split.train_labels),
    }
    results = {name: score(model, *arrays, bs, device) for name, arrays in sets.items()}
    test_preds = results["test"][1]
    confusion = confusion_matrix(split.test_labels, test_preds, len(names))
    metrics = {
        **{f"{name}_{k}": v for name, (m, _) in results.items() for k, v in m.items()},
        "train_test_accuracy_gap": results["train"][0]["accuracy"] - results["test"][0]["accuracy"],
        "best_epoch": summary["best_epoch"],
        "stopped_epoch": summary["stopped_epoch"],
        "per_class_accuracy": per_class_accuracy(confusion, names),
        "test_set_digest": test_set_digest(split.test_images, split.test_labels),
        "mlflow_run_id": summary["mlflow_run_id"],
    }
    write_json(metrics, args.metrics)
    write_json(run_conditions(summary), args.conditions)
    write_predictions(args.predictions, split.test_labels, test_preds, names)
    plot_confusion(confusion, names, args.confusion_png, f"test accuracy {metrics['test_accuracy']:.2%}")
    log_evaluation(Tracker.attach(params, summary["mlflow_run_id"]), metrics, summary, args)
    print(f"evaluate: test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} -> {args.metrics}")


def read_summary(path: Path) -> dict:
    summary = read_json(path, "train stage")
    missing = [k for k in ("best_epoch", "stopped_epoch", "mlflow_run_id") if k not in summary]
    if missing:
        raise StageError(f"{path}: lacks {', '.join(missing)}; rerun the train stage (dvc repro -f train)")
    return summary


def run_conditions(summary: dict) -> dict[str, str]:
    """How the run trained (RUN_CONDITIONS, from its summary) and the precision it was scored in."""
    return {**{k: summary.get(k, "not recorded") for k in RUN_CONDITIONS}, "eval_precision": EVAL_PRECISION}


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """The numbers evaluate measured, under their MLflow names (the epochs are the train stage's to log)."""
    # train_/val_ already name the per-epoch series; the best model's values get their own names
    flat = {
        f"final_{k}" if k.startswith(("train_", "val_")) else k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and k not in ("best_epoch", "stopped_epoch")
    }
    flat.update({f"test_accuracy/{n}": v for n, v in metrics["per_class_accuracy"].items() if v is not None})
    return flat


def log_evaluation(tracker: Tracker, metrics: dict, summary: dict, args: argparse.Namespace) -> None:
    """The run's metrics, and with a logged model also that model's (the Models page shows them), once each."""
    model_id = tracker.logged_model_id()
    tracker.log_new_metrics(evaluation_metrics(metrics), step=metrics["stopped_epoch"], model_id=model_id)
    precisions = {"training_precision": summary.get("precision", "not recorded"), "eval_precision": EVAL_PRECISION}
    tracker.set_tags({"eval_precision": EVAL_PRECISION})  # the run's `precision` tag is the training's
    if model_id is not None:
        tracker.set_model_tags(model_id, precisions)
    for path in (args.metrics, args.conditions, args.predictions, args.confusion_png):
        tracker.log_artifact(path, EVALUATION_ARTIFACTS)


if __name__ == "__main__":
    run_stage(main)
