"""Stage `evaluate`: the best checkpoint on test, validation and (un-augmented) train data.

Writes the DVC metrics file, per-example test predictions (also the DVC
confusion plot) and a confusion-matrix PNG, and logs them to the training
run in MLflow.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from cifar_rounds.cli import StageError, run_stage
from cifar_rounds.engine import predict
from cifar_rounds.figures import pyplot, save_figure
from cifar_rounds.files import write_json
from cifar_rounds.params import Params, load_params
from cifar_rounds.pipeline import eval_batches
from cifar_rounds.split import Split
from cifar_rounds.tracking import Tracker
from cifar_rounds.runtime import RUN_CONDITIONS, amp_dtype, configure_cpu, select_device
from cifar_rounds.train import build_model, load_checkpoint


def load_best(path: Path, params: Params, num_classes: int, device: torch.device) -> torch.nn.Module:
    if not path.exists():
        raise StageError(f"{path}: no best checkpoint; run the train stage first")
    checkpoint = load_checkpoint(path)
    model = build_model(params.model, num_classes, device)
    model.load_state_dict(checkpoint["model"])
    return model


def score(model, images: np.ndarray, labels: np.ndarray, batch_size: int, device, dtype) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and predictions of a set."""
    x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    losses, preds = predict(model, eval_batches(x, y, batch_size), device, dtype)
    preds = preds.numpy()
    return {"loss": losses.mean().item(), "accuracy": float((preds == labels).mean())}, preds


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]"""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray, names: list[str]) -> dict[str, float]:
    totals = confusion.sum(axis=1)
    return {n: float(confusion[i, i] / totals[i]) if totals[i] else 0.0 for i, n in enumerate(names)}


def write_predictions(path: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
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
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > confusion.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True, help="train stage's checkpoint folder")
    parser.add_argument("--summary", type=Path, required=True, help="train stage's summary JSON")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--predictions", type=Path, required=True, help="per-example test predictions CSV")
    parser.add_argument("--confusion-png", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    device = select_device(params.train.device)
    configure_cpu(params.model.width, device)
    dtype = amp_dtype(params.train.precision, device)
    split = Split.load(args.split)
    names = split.label_names
    model = load_best(args.models / "best.pt", params, len(names), device)
    summary = json.loads(args.summary.read_text())

    bs = params.train.eval_batch_size
    test, test_preds = score(model, split.test_images, split.test_labels, bs, device, dtype)
    val, _ = score(model, split.val_images, split.val_labels, bs, device, dtype)
    train, _ = score(model, split.train_images, split.train_labels, bs, device, dtype)
    confusion = confusion_matrix(split.test_labels, test_preds, len(names))
    metrics = {
        **{f"test_{k}": v for k, v in test.items()},
        **{f"val_{k}": v for k, v in val.items()},
        **{f"train_{k}": v for k, v in train.items()},
        "train_test_accuracy_gap": train["accuracy"] - test["accuracy"],
        "best_epoch": summary["best_epoch"],
        "stopped_epoch": summary["stopped_epoch"],
        "per_class_accuracy": per_class_accuracy(confusion, names),
        "mlflow_run_id": summary["mlflow_run_id"],
        **{k: summary[k] for k in RUN_CONDITIONS},  # the training run's, for the round report
    }
    write_json(metrics, args.metrics)
    write_predictions(args.predictions, split.test_labels, test_preds, names)
    plot_confusion(confusion, names, args.confusion_png, f"test accuracy {test['accuracy']:.2%}")

    tracker = Tracker.attach(params, summary["mlflow_run_id"])
    # train_/val_ already name the per-epoch series; the best model's values get their own names
    flat = {
        f"final_{k}" if k.startswith(("train_", "val_")) else k: v
        for k, v in metrics.items() if isinstance(v, (int, float))
    }
    flat.update({f"test_accuracy/{n}": v for n, v in metrics["per_class_accuracy"].items()})
    tracker.log_metrics(flat, step=summary["stopped_epoch"])
    for path in (args.metrics, args.predictions, args.confusion_png):
        tracker.log_artifact(path, "evaluation")
    print(f"evaluate: test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} -> {args.metrics}")


if __name__ == "__main__":
    run_stage(main)
