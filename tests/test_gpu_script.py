"""benchmarks/gpu.sh, the one GPU readiness run, tried where CI runs: without CUDA, and as its CPU dry run."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, env

GPU_SH = str(REPO / "benchmarks" / "gpu.sh")


def gpu_sh(*args: str, out, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([GPU_SH, *args], cwd=REPO, env=env(OUT=str(out), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=timeout)


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
    assert [p["number"] for p in doc["parts"]] == [1, 2, 3, 4, 5, 6] and doc["ok"]
    assert parts["gpu_tests"]["status"] == "skipped"
    assert all(parts[n]["status"] == "passed" for n in ("environment", "pipeline", "resume", "throughput", "projection"))

    pipeline = parts["pipeline"]["results"]
    epochs = len(pipeline["history"])
    assert epochs == 3 and all(steps == [1, 2, 3] for steps in pipeline["epochs_logged"].values())
    assert pipeline["tags"]["device"] == "cpu" and pipeline["tags"]["precision"] in ("fp32", "bf16")
    for column in ("noise_scale", "lambda_max", "hessian_trace"):
        values = [float(v) for v in pipeline["diagnostics"][column]["values"]]  # NaN is written as "nan"
        assert any(math.isfinite(v) for v in values), column
    assert [float(v) for v in pipeline["diagnostics"]["lambda_max"]["values"]] == \
        [v for v in map(float, pipeline["diagnostics"]["lambda_max"]["values"]) if math.isfinite(v)]
    assert pipeline["diagnostics"]["lambda_max"]["epochs"] == [2, 3]  # the milestone and the last epoch

    resume = parts["resume"]["results"]
    assert resume["checkpoint_epoch_at_kill"] == 1 and "resuming" in resume["resumed_line"]
    assert resume["stopped_epoch"] == 3 and resume["run_status"] == "FINISHED"
    assert all(steps == [1, 2, 3] for steps in resume["epochs_logged"].values())
    assert resume["grad_norm_steps"] == resume["grad_norm_steps_unique"] > 0
    distance = resume["distance_to_uninterrupted"]
    assert distance["max_abs_weight_diff"] == 0.0 and distance["bit_exact"]  # CPU, train.deterministic

    text = (out / "gpu-check.txt").read_text()
    summary = text[text.rindex("part "):]
    assert "no part failed" in summary
    assert all(f"\n{n}" in summary and "passed" in summary.split(f"\n{n}")[1].splitlines()[0] for n in "3456")
    assert parts["projection"]["results"]["round_hours"] > 0
