"""scripts/figures.sh refuses what it cannot do in one line, before any work. Both images made from the offline
demo are tested with the first hour (e2e/test_readme.py), on the demo that test makes."""

import sys

from helpers import BIN, REPO, run


def test_without_chromium_the_script_says_so_and_makes_nothing(tmp_path):
    result = run([sys.executable, "scripts/figures.py", "--out", str(tmp_path / "images")], REPO, False, PATH=BIN)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "figures: no chromium on PATH (Debian: apt-get install chromium): MLflow's comparison page cannot be "
        "photographed, so no image was made"
    ]
    assert not (tmp_path / "images").exists()


def test_a_demo_folder_that_is_not_one_is_refused_in_one_line(tmp_path):
    result = run([sys.executable, "scripts/figures.py", "--demo", str(tmp_path)], REPO, False)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"--demo: {tmp_path} is not a folder `cifar-rounds demo` made (it has no mlflow.db)")
    )
    assert not list(tmp_path.iterdir())
