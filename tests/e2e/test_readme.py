"""Every command the README and docs/ quote, and the commands the download error suggests, run as written.

Each command of README.md and docs/*.md is accounted for: run as written here (in a copy of the
repository, or in the offline demo's repository it leaves), or, where as written it trains full
rounds or needs other machines, named with the test that runs the same command at tiny settings.
A command added to a page without an entry here fails the first test. The README stays a
first-hour page: at most 200 lines, linking every page of docs/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from cifar_rounds.core.params import dump_params, load_params, with_overrides
from cifar_rounds.data.synthetic import write_archive

from helpers import REPO, read_json, repository_copy, run, serving

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200
SET_UP = "scripts/setup.sh && source .venv/bin/activate"
DEMO = "cifar-rounds demo"
AFTER_A_RUN = [
    "dvc metrics show",
    "dvc plots show",
    "dvc params diff HEAD~1",
    "dvc metrics diff HEAD~1",
    "dvc exp show --no-pager --only-changed --drop 'Created|State|Executor'",
]
UI = "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
# the first hour's opening, run in this order by the demo test: set up, the demo, into its folder, then each command
RUN_HERE = ["scripts/pipeline.sh", SET_UP, DEMO, "cd offline-demo", "scripts/test.sh tests/gpu", *AFTER_A_RUN, UI]
ROUNDS = "e2e/test_rounds.py::rounds_project"
LOOP = "e2e/test_rounds.py::test_the_readme_loop_runs_on_the_files_the_report_writes_as_written"
REPORT = "e2e/test_rounds.py::test_report_over_seeds_comes_from_the_replicates_measurements"
OVERRIDES = "e2e/test_rounds.py::test_overrides_force_and_queue_work_as_the_readme_shows"
SWEEP = "e2e/test_sweep_workers.py::test_a_pruned_sweep_survives_kills_at_several_moments_and_its_best_trial_becomes_a_round"
# As written these train full rounds (200-250 epochs at full width), or the demo's rounds and sweep (minutes each):
# the named test runs the same command with tiny settings (a generated archive, width 8, a few epochs) on a real
# DVC repository.
AT_TINY_SETTINGS = {
    'mlflow run . --env-manager local --experiment-name cifar-rounds -P preset=round-1 -P overrides="train.patience=40"': "e2e/test_tracking.py::test_mlflow_run_entry_point_runs_the_pipeline_without_touching_params",
    "scripts/figures.sh": "e2e/test_readme.py::test_the_first_hour_opening_then_every_after_a_run_command_and_the_ui_as_written",
    # README, the first hour (in offline-demo/)
    "cifar-rounds run round-1 --epochs 4 --seeds 3": ROUNDS,
    "cifar-rounds run round-2 --epochs 4 --seeds 3": ROUNDS,
    "cifar-rounds report round-1 round-2": REPORT,
    "cifar-rounds sweep sweeps/demo.yaml --workers 2": SWEEP,
    "cifar-rounds promote sweeps/demo.yaml round-3": LOOP,
    "cifar-rounds run round-3 --epochs 4 --seeds 3 --workers 2": LOOP,
    "cifar-rounds report round-2 round-3 --move-aliases": LOOP,
    # docs/rounds-and-verdict.md
    "cifar-rounds run round-1 --seeds 5": ROUNDS,
    "cifar-rounds run round-2 --seeds 5 --workers 2": LOOP,
    "cifar-rounds run round-2 -S train.num_epochs=3 -S train.lr_milestones=[1,2]": OVERRIDES,
    "cifar-rounds run round-2 --epochs 10": ROUNDS,
    "cifar-rounds run round-2 --force": OVERRIDES,
    "dvc params diff round-1-s0 round-2-s0": "e2e/test_rounds.py::test_dvc_compares_the_two_rounds",
    "dvc metrics diff round-1-s0 round-2-s0": "e2e/test_rounds.py::test_dvc_compares_the_two_rounds",
    "cifar-rounds report round-1 round-2 --move-aliases": "e2e/test_rounds.py::test_move_aliases_moves_round_aliases_to_best_seeds_by_validation_and_decides_the_champion",
    # docs/sweep.md
    "cifar-rounds sweep sweeps/round-3.yaml --workers 2": SWEEP,
    "cifar-rounds promote sweeps/round-3.yaml round-3": LOOP,
    "cifar-rounds run round-3 --seeds 5": LOOP,
    "cifar-rounds report round-2 round-3": REPORT,
}
# As written these need what one test machine lacks: 8 GPUs, a team's server host, a shared remote, a clone URL.
# The named test runs the same flow on 127.0.0.1, a local remote and a local clone.
SHARED = "e2e/test_shared_store.py::test_two_machines_run_one_study_on_stores_behind_passwords_and_a_third_compares_their_rounds"
TEAM = "e2e/test_team.py::test_push_clone_pull_reruns_nothing_and_runs_are_on_the_server"
DDP = "e2e/test_distributed.py::test_ddp_training_matches_single_process_logs_once_and_resumes"
ELSEWHERE = {
    "torchrun --standalone --nproc_per_node=8 -m cifar_rounds.stages.train --split data/split.npz --models models "
    "--history reports/history.csv --summary reports/train_summary.json": DDP,
    "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///srv/mlflow/mlflow.db "
    "--artifacts-destination /srv/mlflow/artifacts": TEAM,
    "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000": TEAM,
    "dvc remote add -d team /shared/dvc-remote": TEAM,
    'dvc repro && git add -A && git commit -m "round 2" && dvc push && git push': TEAM,
    "git clone ... && cd ... && scripts/setup.sh && .venv/bin/dvc pull": TEAM,
    ".venv/bin/dvc repro": TEAM,
    "createdb optuna && createdb mlflow": SHARED,
    "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri postgresql+psycopg2://team@db.internal/mlflow "
    "--artifacts-destination /shared/mlartifacts": SHARED,
    "export PGPASSWORD=...  MLFLOW_TRACKING_URI=http://127.0.0.1:5000": SHARED,
    "cifar-rounds sweep sweeps/team.yaml --workers 8 --push origin": SHARED,
    "dvc exp push origin round-2-s0 && dvc exp pull origin round-2-s0": SHARED,
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=node0.internal:29500 -m cifar_rounds.stages.train "
    "--split data/split.npz --models models --history reports/history.csv --summary reports/train_summary.json": DDP,
    # the suite itself, as CI runs it, and its fast subset
    "scripts/test.sh": "CI",
    'scripts/test.sh -m "not slow"': "CI",
    "scripts/test.sh tests/e2e/test_readme.py": "CI",
}
# As written, run by the named test.
RUN_BY_TEST = {
    # in a copy it makes, whose original it deletes
    "cifar-rounds relocate": "e2e/test_record.py::test_a_copy_whose_original_is_gone_loads_and_serves_its_champion_after_one_command",
}
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# the README's images need Chromium (Debian: `apt-get install chromium`); CI installs it and requires them
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = os.environ.get("CIFAR_ROUNDS_REQUIRE_BROWSER") == "1"
IMAGES = ("report-curves.png", "mlflow-compare.png")


def page_commands(page: Path) -> list[str]:
    """Every command of a page's bash blocks (indented ones too): continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_command_of_the_readme_and_docs_is_run_here_or_by_a_named_test():
    accounted = {*RUN_HERE, *AT_TINY_SETTINGS, *ELSEWHERE, *RUN_BY_TEST}
    assert {c for page in PAGES for c in page_commands(page)} == accounted
    for where in [*AT_TINY_SETTINGS.values(), *ELSEWHERE.values(), *RUN_BY_TEST.values()]:
        if where != "CI":
            file, name = where.split("::")
            assert re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), re.M), where


def test_the_readme_is_a_first_hour_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)(?:#[^)]*)?\)", readme))
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked
    assert not [c for c in page_commands(REPO / "README.md") if "python -m cifar_rounds" in c]  # the command's name


def test_every_relative_link_and_image_of_the_pages_is_a_file_and_every_anchor_a_heading():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name}: {target}"


def official_url_reachable() -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(OFFICIAL_URL, method="HEAD"), timeout=5)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_pipeline_offline_fails_with_the_download_error_whose_advice_works_as_written(tmp_path):
    if official_url_reachable():
        pytest.skip("the official URL answers here: the offline error cannot be produced")
    repo = repository_copy(tmp_path / "repo")
    before = (repo / "params.yaml").read_bytes()
    first = run(["scripts/pipeline.sh"], repo, check=False)
    assert first.returncode != 0
    assert f"error: data.url: cannot download {OFFICIAL_URL}" in first.stderr, first.stderr[-2000:]
    advice = re.search(
        r"set data.url in params.yaml to its path .*?and rerun (\S+); to try the pipeline without "
        r"the data set, run (\S+)$",
        first.stderr,
        re.M,
    )
    assert advice.groups() == ("scripts/pipeline.sh", "scripts/offline.sh")
    assert "pipeline: no GPU here" not in first.stdout  # the data first: no training step measured in vain
    assert (repo / "params.yaml").read_bytes() == before and "Traceback" not in first.stderr

    # the advice, followed: a local copy at a path in data.url, then the same command; a file that is not the
    # real archive is refused by its MD5, the documented error
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, train_size=100, test_size=20, seed=0)
    dump_params(with_overrides(load_params(repo / "params.yaml"), {"data.url": str(archive)}), repo / "params.yaml")
    second = run([advice.group(1)], repo, check=False)
    assert second.returncode != 0
    assert (
        f"error: data.md5: {archive.name} has MD5" in second.stderr
        and "expected c58f30108f718f92721af3b95e74349a" in second.stderr
    )


@pytest.mark.slow
def test_the_first_hour_opening_then_every_after_a_run_command_and_the_ui_as_written(tmp_path):
    opening = [SET_UP, DEMO, "cd offline-demo", *AFTER_A_RUN, UI]
    assert page_commands(REPO / "README.md")[2 : 2 + len(opening)] == opening  # the README's order
    repo = repository_copy(tmp_path / "repo")
    before = (repo / "params.yaml").read_bytes()
    start = time.monotonic()
    # as a user types them, in a shell whose PATH has no .venv: activating it puts `cifar-rounds` there
    out = run(["bash", "-c", f"{SET_UP} && {DEMO}"], repo, PATH="/usr/local/bin:/usr/bin:/bin").stdout
    print(f"{DEMO} took {time.monotonic() - start:.0f} s")
    for stage in ("download", "split", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    demo = repo / "offline-demo"  # cd offline-demo
    metrics = read_json(demo / "metrics.json")
    # it ends with the headline, not a table; DVC's advice to `git add` is not printed (the demo commits)
    assert out.strip().splitlines()[-1] == "every metric: dvc metrics show" and "per_class_accuracy" not in out
    assert f"MLflow run {metrics['mlflow_run_id']}" in out and "To track the changes with git" not in out
    assert metrics["test_accuracy"] > 0.3 and (repo / "params.yaml").read_bytes() == before
    assert run(["git", "log", "--format=%s"], demo).stdout.count("\n") == 2
    assert run(["git", "status", "--porcelain"], demo).stdout == ""

    block = readme_block("after-a-run")
    assert block == AFTER_A_RUN
    outputs = {command: run(shlex.split(command), demo).stdout for command in block}  # each exits 0
    assert "test_accuracy" in outputs["dvc metrics show"] and "test_accuracy" in outputs["dvc metrics diff HEAD~1"]
    assert (demo / "dvc_plots" / "index.html").exists() and "dvc_plots/" in (demo / ".gitignore").read_text()
    client = MlflowClient(f"sqlite:///{demo}/mlflow.db")
    assert (
        client.get_run(metrics["mlflow_run_id"]).data.tags["git_commit"]
        == run(["git", "rev-parse", "HEAD~1"], demo).stdout.strip()
    )

    gpu = run(shlex.split("scripts/test.sh tests/gpu"), repo)  # skips cleanly without CUDA, exit 0
    assert " skipped" in gpu.stdout or " passed" in gpu.stdout

    browser = CHROMIUM or REQUIRE_BROWSER
    if browser:  # the README's images, from this demo (the rounds trained at 2 epochs, 2 seeds)
        figures_from(demo, repo)
    with ui_as_written(demo, metrics["mlflow_run_id"]) as url:
        if browser:
            compare_page_draws_each_rounds_charts(url, demo, tmp_path)


def figures_from(demo: Path, repo: Path) -> None:
    """scripts/figures.sh on a demo already made: both images drawn."""
    images = repo / "docs" / "images"
    for name in IMAGES:
        (images / name).unlink(missing_ok=True)
    out = run(["scripts/figures.sh", "--demo", str(demo), "--epochs", "2", "--seeds", "2"], repo).stdout
    assert f"figures: wrote {images / IMAGES[0]} and {images / IMAGES[1]}" in out
    assert "figures: cifar-rounds demo" not in out  # the demo given, not a new one
    curves, page = (imread(images / name) for name in IMAGES)  # height x width x channels
    assert curves.shape[1] > 2 * curves.shape[0]  # the report's three panels side by side
    assert page.shape[:2] == (900, 1400)
    # drawn pages, not blank ones: the curves in two colours with their bands, the page's table and charts
    assert all(len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 100 for image in (curves, page))


def readme_block(marker: str) -> list[str]:
    """The commands of the README's fenced block after `<!-- marker ... -->`, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {marker}.*?-->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@contextmanager
def ui_as_written(demo: Path, run_id: str) -> Iterator[str]:
    """The README's `mlflow ui`, as written (port 5000), answering with the demo's run; yields its URL."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5000)) == 0:
            pytest.skip("port 5000 is taken here: the UI command as written cannot start")
    url = "http://127.0.0.1:5000"
    with serving(shlex.split(UI), demo, f"{url}/health", 60):
        body = urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10).read().decode()
        assert run_id in body
        yield url


def compare_page_draws_each_rounds_charts(url: str, demo: Path, tmp_path: Path) -> None:
    """In headless Chromium, the compare page of the rounds' runs draws their metric charts, and the `val_loss`
    chart page one curve per run."""
    client = MlflowClient(f"sqlite:///{demo}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment], "tags.round LIKE 'round-%'")}
    names = [f"{name}-s{seed}" for name in ("round-1", "round-2") for seed in range(2)]
    assert set(names) <= set(runs), sorted(runs)
    ids, experiments = json.dumps([runs[n] for n in names]), json.dumps([experiment])
    dom, text = rendered_text(f"{url}/#/compare-runs?runs={ids}&experiments={experiments}", tmp_path)
    assert "Comparing 4 Runs" in text and all(n in text for n in names), text[:2000]
    assert "js-plotly-plot" in dom and "val_loss" in text  # the metrics' chart, drawn by plotly
    key = urllib.parse.quote(json.dumps(["val_loss"]))
    dom, text = rendered_text(
        f"{url}/#/metric?runs={ids}&metric={urllib.parse.quote(json.dumps('val_loss'))}"
        f"&experiments={experiments}&plot_metric_keys={key}&plot_layout={{}}&x_axis=step"
        "&y_axis_scale=linear&line_smoothness=1&show_point=false&deselected_curves=[]"
        "&last_linear_y_axis_range=[]",
        tmp_path,
    )
    assert all(f"{n} (val_loss)" in text for n in names), text[:2000]  # one curve per run
    assert len(re.findall(r'class="trace scatter', dom)) >= len(names)


def rendered_text(url: str, tmp_path: Path) -> tuple[str, str]:
    """(the page's DOM after its scripts ran, its visible text), from headless Chromium."""
    assert CHROMIUM is not None, "CIFAR_ROUNDS_REQUIRE_BROWSER=1 but no chromium on PATH"
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
