"""The registered model: each run's LoggedModel and version, and the aliases it is told to move.

Every training run registers one version of `tracking.registered_model`. Which version an
alias points at is decided elsewhere (`analysis.champion`); this module only reads and moves.
Model logging is idempotent: after a kill part-way, the next call completes what is missing
(a READY model is not logged again, a run never gets two versions).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_rounds.core.names import LOGGED_MODEL
from cifar_rounds.tracking.patience import patiently
from cifar_rounds.tracking.store import process_store

if TYPE_CHECKING:
    import torch

CHAMPION = "champion"
VERSION_TAGS = ("round", "seed", "dvc_exp_name", "git_commit")  # run tags each registered version carries
Call = Callable[[str, Callable[[], Any]], Any]  # a store write, retried while the store is busy: call(what, fn)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (another worker may create it at the same moment)."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def run_version(client: MlflowClient, registered_model: str, run_id: str, patience_s: float) -> ModelVersion | None:
    """The version of `registered_model` that run `run_id` registered, or None."""
    found = patiently(
        lambda: client.search_model_versions(f"name = '{registered_model}' AND run_id = '{run_id}'"),
        "reading the registry",
        patience_s,
    )
    return found[0] if found else None


def log_and_register(
    client: MlflowClient,
    run_id: str,
    call: Call,
    model: torch.nn.Module,
    example: torch.Tensor,
    registered_model: str,
    patience_s: float,
) -> None:
    """The best model as this run's LoggedModel and one version of `registered_model`, tagged like the run.

    `pt2` format: torch.export, no pickled code to trust. Idempotent: after a kill part-way, the next
    call completes what is missing (a READY model is not logged again, a run never gets two versions).
    """
    if run_version(client, registered_model, run_id, patience_s) is not None:
        return
    with process_store(client.tracking_uri):
        models = run_models(client, run_id, call)
        for m in models:
            if m.status == LoggedModelStatus.PENDING:  # a kill interrupted its upload: it stays incomplete
                call(
                    "closing an interrupted model",
                    lambda: client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED),
                )
        ready = [m.model_id for m in models if m.status == LoggedModelStatus.READY]
        model_id = ready[0] if ready else log_logged_model(client, run_id, call, model, example)
        register(client, run_id, call, model_id, registered_model)


def log_logged_model(
    client: MlflowClient, run_id: str, call: Call, model: torch.nn.Module, example: torch.Tensor
) -> str:
    import mlflow.pytorch
    from mlflow.models import infer_signature

    run = call("reading the run", lambda: client.get_run(run_id))
    # created here, not by log_model: it would put a model it creates in the process's active
    # experiment (MLflow's default one here), not in the run's
    model_id = call(
        "creating the logged model",
        lambda: client.create_logged_model(
            run.info.experiment_id, name=LOGGED_MODEL, source_run_id=run_id, params=run.data.params
        ),
    ).model_id
    x = example.numpy()
    signature = infer_signature(x, model(example).detach().numpy())
    # requirements given, not inferred: inference imports the model in a subprocess (about 9 s)
    call(
        "logging the model",
        lambda: mlflow.pytorch.log_model(
            model,
            name=LOGGED_MODEL,
            serialization_format="pt2",
            input_example=x,
            signature=signature,
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            run_id=run_id,
            model_id=model_id,
        ),
    )
    return model_id


def register(client: MlflowClient, run_id: str, call: Call, model_id: str, name: str) -> None:
    """One version of `name` for the run's LoggedModel, tagged like the run."""
    tags = call("reading the run", lambda: client.get_run(run_id)).data.tags
    call("creating the registered model", lambda: ensure_registered_model(client, name))
    call(
        "registering the model",
        lambda: client.create_model_version(
            name,
            f"models:/{model_id}",
            run_id=run_id,
            tags={k: tags.get(k, "") for k in VERSION_TAGS},
            model_id=model_id,
        ),
    )


def run_models(client: MlflowClient, run_id: str, call: Call) -> list[LoggedModel]:
    """The run's LoggedModels of the best model, whatever their status."""
    run = call("reading the run", lambda: client.get_run(run_id))
    return list(
        call(
            "reading the run's models",
            lambda: client.search_logged_models(
                [run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL}'",
            ),
        )
    )


def ready_model_id(client: MlflowClient, run_id: str, call: Call) -> str | None:
    """The id of this run's READY LoggedModel (its best model), or None when it has none."""
    ready = [m.model_id for m in run_models(client, run_id, call) if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def round_alias(name: str) -> str:
    """The round's alias: its name, with each character MLflow refuses in an alias replaced by '-'."""
    return re.sub(r"[^\w-]", "-", name)


def alias_version(client: MlflowClient, name: str, alias: str, patience_s: float) -> ModelVersion | None:
    def get() -> ModelVersion | None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                return None  # no such alias, or no such registered model yet
            raise

    return patiently(get, f"reading alias @{alias} of {name}", patience_s)


def set_alias(client: MlflowClient, name: str, alias: str, version: str, patience_s: float) -> None:
    """Point `name@alias` at `version`."""
    patiently(lambda: client.set_registered_model_alias(name, alias, version), f"setting @{alias}", patience_s)


def absent(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def model_tags(client: MlflowClient, name: str, patience_s: float) -> dict[str, str] | None:
    """The registered model's tags; None when there is no such registered model."""

    def get() -> dict[str, str] | None:
        try:
            return dict(client.get_registered_model(name).tags)
        except MlflowException as error:
            if absent(error):
                return None
            raise

    return patiently(get, f"reading the tags of {name}", patience_s)


def set_model_tag(client: MlflowClient, name: str, key: str, value: str, patience_s: float) -> None:
    patiently(lambda: client.set_registered_model_tag(name, key, value), f"setting tag {key} of {name}", patience_s)


def version_exists(client: MlflowClient, name: str, version: str, patience_s: float) -> bool:
    """Whether `name` still has `version` (a deleted version does not)."""

    def get() -> bool:
        try:
            client.get_model_version(name, version)
            return True
        except MlflowException as error:
            if absent(error):
                return False
            raise

    return patiently(get, f"reading version {version} of {name}", patience_s)
