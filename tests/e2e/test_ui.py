"""The MLflow UI in a real browser: two finished tiny rounds, compared, their metric charts drawn.

Needs Chromium (Debian: `apt-get install chromium`); skipped without it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import contextmanager

import pytest
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import free_port, make_project, run, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this, so that the test runs there rather than skips; users without it skip
REQUIRED = os.environ.get("CIFAR_ROUNDS_REQUIRE_BROWSER") == "1"
pytestmark = [pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Chromium is not installed")]


def test_the_browser_is_there_where_it_is_required():
    assert CHROMIUM is not None, "CIFAR_ROUNDS_REQUIRE_BROWSER=1 but no chromium on PATH"


@contextmanager
def mlflow_ui(project):
    """`mlflow ui` on 127.0.0.1; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        f"sqlite:///{project}/mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    with serving(cmd, project, f"{url}/health"):
        yield url


def rendered_text(url: str, tmp_path) -> tuple[str, str]:
    """(the page's DOM after its scripts ran, its visible text), from headless Chromium."""
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=30000",
            "--window-size=1400,2000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))
    return dom, " ".join(text.split())


def test_the_compare_page_draws_the_metric_charts_of_both_rounds(tmp_path):
    archive = tmp_path / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=2)
    project = make_project(
        tmp_path / "p", (archive, md5), **{"data.val_size": 50, "model.width": 8, "tracking.log_model": False}
    )
    for preset in ("round-1", "round-2"):
        run(["python", "-m", "cifar_rounds.analysis.rounds", "run", preset, "--epochs", "2"], project)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    assert sorted(runs) == ["round-1", "round-2"]
    ids, experiments = json.dumps(list(runs.values())), json.dumps([experiment])
    with mlflow_ui(project) as url:
        dom, text = rendered_text(f"{url}/#/compare-runs?runs={ids}&experiments={experiments}", tmp_path)
        assert "Comparing 2 Runs" in text and "round-1" in text and "round-2" in text
        assert "js-plotly-plot" in dom and "val_loss" in text  # the metrics' chart, drawn by plotly
        key = urllib.parse.quote(json.dumps(["val_loss"]))
        dom, text = rendered_text(
            f"{url}/#/metric?runs={ids}&metric={urllib.parse.quote(json.dumps('val_loss'))}"
            f"&experiments={experiments}&plot_metric_keys={key}&plot_layout={{}}&x_axis=step"
            "&y_axis_scale=linear&line_smoothness=1&show_point=false&deselected_curves=[]"
            "&last_linear_y_axis_range=[]",
            tmp_path,
        )
        assert "round-1 (val_loss)" in text and "round-2 (val_loss)" in text  # one curve per round
        assert len(re.findall(r'class="trace scatter', dom)) >= 2
