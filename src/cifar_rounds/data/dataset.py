"""The split stage's output: training, validation and test arrays in one uncompressed .npz.

Images are uint8 (N, 3, 32, 32), labels int64: training loads the file in a
fraction of a second and never decodes images.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.files import atomic_path


@dataclass(frozen=True)
class Split:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]

    @property
    def sizes(self) -> dict[str, int]:
        """Images per part: train, val, test."""
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in vars(self).items()})

    @classmethod
    def load(cls, path: Path) -> Split:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["label_names"] = [str(n) for n in arrays["label_names"]]
            return cls(**arrays)
        except FileNotFoundError:
            raise StageError(f"{path}: not found; run the split stage first (dvc repro split)") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StageError(
                f"{path}: not a readable split ({first}); expected the split stage's .npz: rerun the split stage "
                "(dvc repro -f split)"
            ) from None
