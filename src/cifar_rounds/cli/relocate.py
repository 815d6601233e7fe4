"""`cifar-rounds relocate`: after copying or moving the repository, point its MLflow store into it.

The store (`mlflow.db`) keeps absolute paths to `mlartifacts/`. Every stage and report rebases
them when it opens the store; run this first where MLflow itself is the first to read it in the
copy (`mlflow models serve`, `mlflow.pytorch.load_model`, `mlflow ui`).
"""

from __future__ import annotations

from cifar_rounds.core.errors import StageError, run_stage
from cifar_rounds.core.inputs import command_parser
from cifar_rounds.core.params import load_params
from cifar_rounds.core.urls import without_password
from cifar_rounds.tracking.store import (
    ARTIFACTS_DIR,
    SQLITE,
    STORE_FILE,
    relocate_store,
    repo_root,
    tracking_uri,
    uri_source,
)

EXAMPLE = """example, in a copied or moved repository:
  cifar-rounds relocate    # its mlflow.db now points into its own mlartifacts/"""


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    command_parser(prog, __doc__.splitlines()[0], EXAMPLE).parse_args(argv)
    params = load_params()
    root = repo_root()
    uri = tracking_uri(params, root)
    if uri != f"{SQLITE}{root / STORE_FILE}":
        raise StageError(
            f"{uri_source(params)}: the store is {without_password(uri)}, not this repository's {STORE_FILE}: "
            "it did not move"
        )
    if not relocate_store(root, params.tracking.store_patience_s):
        print(f"relocate: {root / STORE_FILE} already points into {root / ARTIFACTS_DIR}")


if __name__ == "__main__":
    run_stage(main)
