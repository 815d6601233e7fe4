"""scripts/figures.sh, as the README names it: both images made from the offline demo; without Chromium, one line.

The run needs Chromium (Debian: `apt-get install chromium`) and is skipped without it, as the UI test is.
"""

import shutil
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from helpers import BIN, REPO, repository_copy, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGES = ("report-curves.png", "mlflow-compare.png")


def test_without_chromium_the_script_says_so_and_makes_nothing(tmp_path):
    result = run([sys.executable, "scripts/figures.py", "--out", str(tmp_path / "images")], REPO, False, PATH=BIN)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "figures: no chromium on PATH (Debian: apt-get install chromium): MLflow's comparison page cannot be "
        "photographed, so no image was made"
    ]
    assert not (tmp_path / "images").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
@pytest.mark.timeout(2400)  # the demo and four trainings of 2 epochs: minutes on 2 shared cores
def test_the_figures_script_makes_both_images_from_the_offline_demo(tmp_path):
    repo = repository_copy(tmp_path / "repo")
    images = repo / "docs" / "images"
    for name in IMAGES:
        (images / name).unlink(missing_ok=True)
    out = run(["scripts/figures.sh", "--epochs", "2", "--seeds", "2"], repo).stdout
    assert f"figures: wrote {images / IMAGES[0]} and {images / IMAGES[1]}" in out
    curves, page = (imread(images / name) for name in IMAGES)  # height x width x channels
    assert curves.shape[1] > 2 * curves.shape[0]  # the report's three panels side by side
    assert page.shape[:2] == (900, 1400)
    # drawn pages, not blank ones: the curves in two colours with their bands, the page's table and charts
    assert all(len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 100 for image in (curves, page))
