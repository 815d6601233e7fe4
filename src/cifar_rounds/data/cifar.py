"""The CIFAR-10 python archive format: reading its pickles safely, writing them for tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)  # each row is 1024 R, then 1024 G, then 1024 B bytes
NUM_CLASSES = 10
CIFAR10_TRAIN_IMAGES = 50_000  # in the official archive's five training batches

# The real files hold numpy arrays, lists and strings; nothing else may be unpickled.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes from Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


def read_batches(batches_dir: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,), concatenated in order."""
    images, labels = [], []
    for name in names:
        batch = read_pickle(batches_dir / name)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *IMAGE_SHAPE))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_label_names(batches_dir: Path) -> list[str]:
    return list(read_pickle(batches_dir / META_FILE)["label_names"])


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    """One batch file exactly as the real archive has it (protocol 2, bytes-free dict)."""
    batch = {
        "batch_label": batch_label,
        "labels": [int(v) for v in labels],
        "data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8),
        "filenames": [f"synthetic_{i:06d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
