"""Atomic writes: a kill never leaves half a file where a finished one is expected."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar_rounds.core.errors import StageError
from cifar_rounds.core.inputs import FileArgumentError, read_text


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed onto `path` only if the block succeeds.

    The temporary name is unique, so two writers of the same file never write into one temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise StageError(
            f"{path.parent}: cannot write here ({error.strerror}); check the folder's permissions"
        ) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a missing, empty or garbled file is a one-line error naming `what` wrote it."""
    try:
        value = json.loads(read_text(Path(path), f"the {what}'s JSON"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the {what} first") from None
    except FileArgumentError as error:  # a folder, binary or empty
        raise StageError(f"{error}; rerun the {what} to rewrite it") from None
    except json.JSONDecodeError as error:
        raise StageError(f"{path}: not valid JSON ({error}); rerun the {what} to rewrite it") from None
    if not isinstance(value, dict):
        raise StageError(f"{path}: expected a JSON object; rerun the {what} to rewrite it")
    return value


def file_md5(path: Path) -> str:
    """The MD5 hex digest of a file's bytes: the hash DVC records for it in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
