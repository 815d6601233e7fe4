"""A moved store's paths, rebased on a real MLflow sqlite schema: what MLflow reads moves, what records a run stays."""

import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from cifar_rounds.core.errors import StageError
from cifar_rounds.tracking.store import ARTIFACTS_DIR, STORE_FILE, rebase_moved_store, relocate_store


def column(db, query: str) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [value for (value,) in con.execute(query).fetchall()]
    finally:
        con.close()


@pytest.fixture
def moved(tmp_path, monkeypatch):
    """A store made at `old_root` (a name with LIKE's wildcards), then moved to `new_root`."""
    old_root, new_root = tmp_path / "old_10%", tmp_path / "new"
    old_root.mkdir()
    monkeypatch.chdir(old_root)  # MLflow puts the Default experiment under the working folder
    client = MlflowClient(f"sqlite:///{old_root / STORE_FILE}")
    experiment = client.create_experiment("e", artifact_location=(old_root / ARTIFACTS_DIR).as_uri())
    run = client.create_run(experiment, tags={"dvc_root": str(old_root)})
    model = client.create_logged_model(experiment, source_run_id=run.info.run_id)
    client.create_registered_model("m")
    client.create_model_version("m", f"models:/{model.model_id}", run_id=run.info.run_id, model_id=model.model_id)
    # a neighbour that a LIKE pattern `old_10%/...` would also match: not under the moved folder
    neighbour = client.create_run(experiment).info.run_id
    elsewhere = f"{(tmp_path / 'oldX10abc' / ARTIFACTS_DIR).as_uri()}/{neighbour}/artifacts"
    con = sqlite3.connect(old_root / STORE_FILE)
    with con:
        con.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (elsewhere, neighbour))
    con.close()
    old_root.rename(new_root)
    return old_root, new_root, {run.info.run_id: None, neighbour: elsewhere}


def test_every_artifact_path_moves_and_the_runs_record_stays(moved, capsys):
    old_root, new_root, runs = moved
    db = new_root / STORE_FILE
    here = (new_root / ARTIFACTS_DIR).as_uri()
    assert rebase_moved_store(db, new_root, 5)
    assert capsys.readouterr().out.count("the repository moved") == 1
    locations = column(db, "SELECT artifact_location FROM experiments ORDER BY experiment_id")
    assert locations == [str(new_root / "mlruns/0"), here]  # the Default experiment's is a plain path
    versions = column(db, "SELECT storage_location FROM model_versions")
    models = column(db, "SELECT artifact_location FROM logged_models")
    assert versions == models and models[0].startswith(f"{here}/models/")
    uris = dict(
        zip(
            column(db, "SELECT run_uuid FROM runs ORDER BY run_uuid"),
            column(db, "SELECT artifact_uri FROM runs ORDER BY run_uuid"),
        )
    )
    assert {r: uris[r] for r in runs} == {r: e or f"{here}/{r}/artifacts" for r, e in runs.items()}
    assert column(db, "SELECT value FROM tags WHERE key = 'dvc_root'") == [str(old_root)]  # where it ran
    assert not rebase_moved_store(db, new_root, 5)  # nothing left to move


def test_relocating_where_there_is_no_store_is_one_line_naming_it(tmp_path):
    with pytest.raises(StageError, match=f"{tmp_path / STORE_FILE}: no MLflow store here"):
        relocate_store(tmp_path, 5)
