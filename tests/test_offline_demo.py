"""The README's offline command: every stage on a generated archive, the user's params.yaml untouched."""

import sys

import pytest

from conftest import REPO, read_json, run

pytestmark = pytest.mark.slow


def test_offline_demo_runs_every_stage_without_touching_params(tmp_path):
    before = (REPO / "params.yaml").read_bytes()
    out = run([sys.executable, "-m", "cifar_rounds.demo", "--dir", str(tmp_path / "demo")], REPO).stdout
    for stage in ("download", "split", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "offline run complete" in out
    metrics = read_json(tmp_path / "demo" / "metrics.json")
    assert metrics["test_accuracy"] > 0.3 and metrics["stopped_epoch"] >= 1
    assert (REPO / "params.yaml").read_bytes() == before
