"""The README's two images, made from the offline demo: the round report's figure and MLflow's comparison page.

Runs what the README's first hour runs (`cifar-rounds demo`, two short rounds of three seeds,
`cifar-rounds report round-1 round-2`) in a temporary folder, or in a demo made before (`--demo DIR`),
then serves that demo's store with `mlflow ui` on 127.0.0.1 and photographs the runs' comparison page in
headless Chromium.
Writes `report-curves.png` and `mlflow-compare.png` into `--out` (default docs/images/).
Without Chromium it says so and exits 1 before any work: no image is drawn any other way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar_rounds.core.names import MLFLOW_SERVER_QUIET_ENV

REPO = Path(__file__).resolve().parents[1]
ROUNDS = ("round-1", "round-2")
EPOCHS, SEEDS = 4, 3  # the README's first hour
WINDOW = "1400,900"  # the screenshot's size in pixels: the compare page's run table and its first charts
UI_START_S = 120  # `mlflow ui` answers its health check within this, or the script stops


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def command(args: list[str], cwd: Path) -> None:
    """A `cifar-rounds` command from this interpreter's environment, its output shown as it runs."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    print(f"figures: {' '.join(args)}", flush=True)
    if subprocess.run(args, cwd=cwd, env=env).returncode != 0:
        raise SystemExit(f"figures: {' '.join(args)} failed; its output is above")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(store: Path) -> Iterator[str]:
    """`mlflow ui` on the store, in its own process group (stopped afterwards); yields its URL once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    quiet = {**os.environ, **MLFLOW_SERVER_QUIET_ENV}
    server = subprocess.Popen(
        cmd, env=quiet, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"figures: mlflow ui did not answer on {url} within {UI_START_S} s") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def compare_url(url: str, store: Path, seeds: int) -> str:
    """The comparison page of the rounds' runs, in the order MLflow lists them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
    tagged = " OR ".join(f"tags.round = '{name}'" for name in ROUNDS)
    runs = [r for name in ROUNDS for r in client.search_runs([experiment], f"tags.round = '{name}'")]
    if len(runs) != len(ROUNDS) * seeds:
        raise SystemExit(f"figures: expected {len(ROUNDS) * seeds} runs ({tagged}), found {len(runs)}")
    ids = json.dumps([r.info.run_id for r in runs])
    return f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}"


def screenshot(chromium: str, url: str, path: Path, profile: Path) -> None:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-proxy-server"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    flags += ["--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=30000"]
    result = subprocess.run(
        [chromium, *flags, f"--window-size={WINDOW}", f"--screenshot={path}", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.returncode != 0 or not path.is_file():
        raise SystemExit(f"figures: chromium made no screenshot of {url}: {result.stderr.strip()[-500:]}")


def make_figures(work: Path, out: Path, chromium: str, epochs: int, seeds: int, demo: Path | None) -> None:
    if demo is None:
        demo = work / "demo"
        command(["cifar-rounds", "demo", "--dir", str(demo)], REPO)
    for name in ROUNDS:
        command(["cifar-rounds", "run", name, "--epochs", str(epochs), "--seeds", str(seeds)], demo)
    report = work / "report" / "round-1-vs-round-2.md"
    command(["cifar-rounds", "report", *ROUNDS, "--out", str(report)], demo)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report.with_suffix(".png"), out / "report-curves.png")
    with mlflow_ui(demo / "mlflow.db") as url:
        screenshot(chromium, compare_url(url, demo / "mlflow.db", seeds), out / "mlflow-compare.png", work / "chromium")
    print(f"figures: wrote {out / 'report-curves.png'} and {out / 'mlflow-compare.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the two PNG files")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="each round's epochs (the README's: %(default)s)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="each round's seeds (the README's: %(default)s)")
    parser.add_argument(
        "--demo",
        type=Path,
        help="the folder of an offline demo `cifar-rounds demo` made, to use instead of a new one (replicates it "
        "already trained are not trained again)",
    )
    args = parser.parse_args()
    if args.epochs < 1 or args.seeds < 2:
        parser.error("--epochs: at least 1; --seeds: at least 2 (the report's bands)")
    if args.demo and not (args.demo / "mlflow.db").is_file():
        parser.error(f"--demo: {args.demo} is not a folder `cifar-rounds demo` made (it has no mlflow.db)")
    chromium = browser()
    if chromium is None:
        raise SystemExit(
            "figures: no chromium on PATH (Debian: apt-get install chromium): MLflow's comparison page cannot be "
            "photographed, so no image was made"
        )
    with tempfile.TemporaryDirectory(prefix="cifar-rounds-figures-") as work:
        demo = args.demo.resolve() if args.demo else None
        make_figures(Path(work), args.out.resolve(), chromium, args.epochs, args.seeds, demo)


if __name__ == "__main__":
    main()
