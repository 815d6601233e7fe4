"""Matplotlib without a display, and one way to write a figure."""

from __future__ import annotations

from pathlib import Path

from cifar_rounds.core.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write the figure whole or not at all, in the format its name says."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip("."))
    pyplot().close(fig)
