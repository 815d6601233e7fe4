"""`python -m cifar_rounds.data.synthetic`: a CIFAR-10-format archive of generated, learnable images.

For tests and offline runs: the same download, checksum, extraction and
reading code handles it as it does the real archive.
"""

from __future__ import annotations

import argparse
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from cifar_rounds.core.errors import run_stage
from cifar_rounds.core.files import file_md5
from cifar_rounds.core.inputs import output_file
from cifar_rounds.data.cifar import BATCHES_DIR, META_FILE, NUM_CLASSES, TEST_FILE, TRAIN_FILES, write_batch

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def generate_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels; each class a colour and a stripe orientation, under heavy noise."""
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    colours = np.linspace(40, 215, NUM_CLASSES)[:, None] * np.array([1.0, 0.6, 0.3])[None, :]
    yy, xx = np.mgrid[0:32, 0:32]
    angles = np.linspace(0, np.pi, NUM_CLASSES, endpoint=False)
    stripes = np.stack([np.sin((xx * np.cos(a) + yy * np.sin(a)) * 0.6) for a in angles]) * 40
    images = colours[labels][:, :, None, None] + stripes[labels][:, None, :, :]
    images = images + rng.normal(0, 45, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_archive(out: Path, train_size: int, test_size: int, seed: int) -> str:
    """Write the .tar.gz and return its md5."""
    rng = np.random.default_rng(seed)
    train_x, train_y = generate_images(train_size, rng)
    test_x, test_y = generate_images(test_size, rng)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / BATCHES_DIR
        root.mkdir()
        parts = np.array_split(np.arange(train_size), len(TRAIN_FILES))
        for i, (name, idx) in enumerate(zip(TRAIN_FILES, parts), start=1):
            write_batch(root / name, train_x[idx], train_y[idx], f"training batch {i} of 5")
        write_batch(root / TEST_FILE, test_x, test_y, "testing batch 1 of 1")
        meta = {"num_cases_per_batch": len(parts[0]), "label_names": LABEL_NAMES, "num_vis": 3072}
        (root / META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:gz") as tar:
            tar.add(root, arcname=BATCHES_DIR)
    return file_md5(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="archive to write (.tar.gz)")
    parser.add_argument("--train-size", type=int, default=2000, help="training images (split over 5 batches)")
    parser.add_argument("--test-size", type=int, default=500, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    if args.train_size < 5 * NUM_CLASSES or args.test_size < NUM_CLASSES:
        parser.error(f"--train-size must be >= {5 * NUM_CLASSES} and --test-size >= {NUM_CLASSES}")
    output_file(args.out, "the archive (.tar.gz)")
    print(write_archive(args.out, args.train_size, args.test_size, args.seed))


if __name__ == "__main__":
    run_stage(main)
