"""benchmarks/gpu.sh, the one GPU readiness run, tried where CI runs: without CUDA, and as its CPU dry run."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, env

GPU_SH = str(REPO / "benchmarks" / "gpu.sh")


def gpu_sh(*args: str, out, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPU_SH, *args],
        cwd=REPO,
        env=env(OUT=str(out), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    result = gpu_sh(out=tmp_path / "out", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA device" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_passes_the_pipeline_and_resume_parts_with_real_values(tmp_path):
    out = tmp_path / "out"
    result = gpu_sh("--dry-run", "--work", str(tmp_path / "work"), out=out, timeout=1700)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    doc = json.loads((out / "gpu-check.json").read_text())
    parts = {p["name"]: p for p in doc["parts"]}
    assert [p["number"] for p in doc["parts"]] == [1, 2, 3, 4, 5, 6, 7] and doc["ok"]
    assert parts["gpu_tests"]["status"] == "skipped"
    assert all(
        parts[n]["status"] == "passed"
        for n in ("environment", "pipeline", "resume", "throughput", "projection", "concurrency")
    )

    pipeline = parts["pipeline"]["results"]
    epochs = len(pipeline["history"])
    assert epochs == 3 and all(steps == [1, 2, 3] for steps in pipeline["epochs_logged"].values())
    assert pipeline["tags"]["device"] == "cpu" and pipeline["tags"]["precision"] in ("fp32", "bf16")
    values = {k: [float(v) for v in d["values"]] for k, d in pipeline["diagnostics"].items()}  # NaN written "nan"
    assert all(math.isfinite(v) for v in values["lambda_max"] + values["hessian_trace"])
    assert any(math.isfinite(v) for v in values["noise_scale"])  # NaN only while the |G|^2 average is not positive
    assert pipeline["diagnostics"]["lambda_max"]["epochs"] == [2, 3]  # the milestone and the last epoch

    resume = parts["resume"]["results"]
    # half a first epoch (with its warm-up) after epoch 1 is in the history: during epoch 2, or just after it
    assert 1 <= resume["checkpoint_epoch_at_kill"] < 3 and "resuming" in resume["resumed_line"]
    assert resume["stopped_epoch"] == 3 and resume["run_status"] == "FINISHED"
    assert all(steps == [1, 2, 3] for steps in resume["epochs_logged"].values())
    assert resume["grad_norm_steps"] == resume["grad_norm_steps_unique"] > 0
    distance = resume["distance_to_uninterrupted"]
    assert distance["max_abs_weight_diff"] == 0.0 and distance["bit_exact"]  # CPU, train.deterministic

    assert parts["projection"]["results"]["round_hours"] > 0
    sharing = parts["concurrency"]["results"]
    assert [r["trainings"] for r in sharing["rows"]] == [1, 2] and all(r["total_img_s"] > 0 for r in sharing["rows"])
    assert sharing["rows"][0]["per_run_slowdown"] == 1.0 and sharing["slots_per_gpu_that_pay"] in (1, 2)

    text = (out / "gpu-check.txt").read_text()
    assert summary_statuses(text) == {
        "1": "passed",
        "2": "skipped",
        "3": "passed",
        "4": "passed",
        "5": "passed",
        "6": "passed",
        "7": "passed",
    }
    assert text.rstrip().endswith("no part failed")


def summary_statuses(text: str) -> dict[str, str]:
    """Part number -> status, from the summary table that ends gpu-check.txt."""
    table = text[text.rindex("\npart ") :]
    return dict(re.findall(r"^(\d) .*? (passed|failed|skipped) ", table, re.M))
