"""`cifar-rounds show --headline`: what the last run of the pipeline ended with, in four lines.

Test and validation accuracy, the train-val gap, the best and stopped epoch, and where the run
is in MLflow; `dvc metrics show` prints every number. `scripts/pipeline.sh` and the offline
demo end with it.
"""

from __future__ import annotations

from pathlib import Path

from cifar_rounds.analysis.replicates import ArtifactPaths
from cifar_rounds.core.errors import run_stage
from cifar_rounds.core.files import read_json
from cifar_rounds.core.inputs import command_parser
from cifar_rounds.core.params import Params, load_params
from cifar_rounds.core.urls import without_password
from cifar_rounds.tracking.store import repo_root, tracking_uri

EXAMPLE = """example:
  cifar-rounds show --headline    # in the repository (or offline-demo/) after dvc repro"""


def ui_command(uri: str) -> str:
    """How to browse the store: a server is its own UI; a local store needs `mlflow ui`."""
    shown = without_password(uri)
    return shown if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {shown}"


def headline(metrics: dict, params: Params, root: Path) -> list[str]:
    return [
        f"test accuracy {metrics['test_accuracy']:.2%}, validation accuracy {metrics['val_accuracy']:.2%} "
        f"(train-val gap {metrics['train_accuracy'] - metrics['val_accuracy']:+.2%})",
        f"best epoch {metrics['best_epoch']}, stopped after epoch {metrics['stopped_epoch']}",
        f"MLflow run {metrics['mlflow_run_id']} in experiment {params.tracking.experiment_name!r}: "
        f"{ui_command(tracking_uri(params, root))}",
        "every metric: dvc metrics show",
    ]


def print_headline(root: Path, params: Params) -> None:
    metrics = read_json(root / ArtifactPaths.from_dvc(root).metrics, "pipeline (dvc repro)")
    print("\n".join(headline(metrics, params, root)))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    command_parser(prog, __doc__.splitlines()[0], EXAMPLE).parse_args(argv)
    print_headline(repo_root(), load_params())


if __name__ == "__main__":
    run_stage(main)
