"""Stage `split`: a stratified, seeded train/validation split, saved as compact uint8 arrays.

The output is one uncompressed .npz (images uint8 (N, 3, 32, 32), labels
int64): training loads it in a fraction of a second and never decodes images.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.inputs import input_folder, output_file
from cifar_rounds.core.params import load_params
from cifar_rounds.data.cifar import BATCHES_DIR, TEST_FILE, TRAIN_FILES, read_batches, read_label_names
from cifar_rounds.data.dataset import Split


def stratified_val_indices(labels: np.ndarray, val_size: int, seed: int) -> np.ndarray:
    """Indices of a validation set whose class proportions match `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    if val_size >= len(labels):
        raise StageError(f"data.val_size: {val_size} must be smaller than the {len(labels)} training images")
    if val_size < len(classes):
        raise StageError(f"data.val_size: {val_size} must be at least the {len(classes)} classes")
    exact = counts * val_size / len(labels)
    quota = np.floor(exact).astype(int)
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[: val_size - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def make_split(batches_dir: Path, val_size: int, seed: int) -> Split:
    try:
        images, labels = read_batches(batches_dir, TRAIN_FILES)
        test_images, test_labels = read_batches(batches_dir, (TEST_FILE,))
        names = read_label_names(batches_dir)
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageError(
            f"{batches_dir}: not the CIFAR-10 batches ({first}); rerun the download stage (dvc repro -f download)"
        ) from None
    val = stratified_val_indices(labels, val_size, seed)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return Split(
        images[train],
        labels[train],
        images[val],
        labels[val],
        test_images,
        test_labels,
        names,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="download stage's output folder")
    parser.add_argument("--out", type=Path, required=True, help=".npz file to write")
    args = parser.parse_args()
    input_folder(args.raw, f"the download stage's folder, holding {BATCHES_DIR}/")
    output_file(args.out, "the split's .npz")
    params = load_params()
    split = make_split(args.raw / BATCHES_DIR, params.data.val_size, params.data.seed)
    split.save(args.out)
    print(
        f"split: {len(split.train_labels)} train, {len(split.val_labels)} validation, "
        f"{len(split.test_labels)} test images -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
