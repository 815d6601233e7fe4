"""A command's arguments: its parser, and file arguments checked before it works (a folder, binary or empty file
where another was expected).

Each refusal is one line naming the path and what was expected. This module imports
nothing of the package, so that the params reader can use it too.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def command_parser(prog: str | None, description: str, example: str) -> argparse.ArgumentParser:
    """A command's parser: its one-line description, and `example` (already laid out) after the options in --help."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter
    )


class FileArgumentError(ValueError):
    """A file argument of the wrong kind; the message is one line naming it and what was expected."""


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of `path`; a folder, a binary or an empty file is refused (a missing one raises
    FileNotFoundError, whose advice the caller knows)."""
    path = Path(path)
    if path.is_dir():
        raise FileArgumentError(f"{path}: a folder; expected {expected}")
    data = path.read_bytes()
    if not data.strip():
        raise FileArgumentError(f"{path}: empty; expected {expected}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileArgumentError(f"{path}: not UTF-8 text (a binary file?); expected {expected}") from None


def input_file(path: Path, expected: str) -> Path:
    """`path` if it is a non-empty file or does not exist yet (the reader says how to make it); refused if a
    folder or empty."""
    if path.is_dir():
        raise FileArgumentError(f"{path}: a folder; expected {expected}")
    if path.is_file() and path.stat().st_size == 0:
        raise FileArgumentError(f"{path}: empty; expected {expected}")
    return path


def output_file(path: Path, expected: str) -> Path:
    """`path` if a file can be written there (whatever it holds now is replaced); refused if a folder."""
    if path.is_dir():
        raise FileArgumentError(f"{path}: a folder; expected {expected} to write")
    return path


def input_folder(path: Path, expected: str) -> Path:
    """`path` if it is a folder; refused if a file or missing."""
    if not path.exists():
        raise FileArgumentError(f"{path}: not found; expected {expected}")
    if not path.is_dir():
        raise FileArgumentError(f"{path}: a file; expected {expected}")
    return path


def folder(path: Path, expected: str) -> Path:
    """`path` if it is a folder or does not exist yet; refused if a file."""
    if path.exists() and not path.is_dir():
        raise FileArgumentError(f"{path}: a file; expected {expected}")
    return path
