"""Several machines, one study, one tracking store: a real PostgreSQL behind Optuna and an `mlflow server`.

Two clones of the project stand for two machines: each runs the same sweep command (its own workers
in its own clones), on one study in PostgreSQL and one tracking server whose backend store is
PostgreSQL, pushing each trial to the team's git remote with its files in the DVC remote. Their
experiments reach a third clone, which compares the rounds and promotes the study's best trial.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.data.synthetic import write_archive

from helpers import env, make_project, run, tracking_server
from pg import SMALL, postgresql

TRIALS = 4


def machine(origin: Path, target: Path) -> Path:
    """A clone of the shared repository: another machine."""
    run(["git", "clone", "-q", str(origin), str(target)], origin.parent)
    run(["git", "config", "user.email", "pipeline@localhost"], target)
    run(["git", "config", "user.name", "cifar-rounds"], target)
    return target


@pytest.mark.timeout(2400)
def test_two_machines_run_one_study_on_postgresql_and_a_third_compares_their_rounds(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = write_archive(archive, train_size=360, test_size=100, seed=4)
    first = make_project(tmp_path / "first", (archive, md5), **SMALL)
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], first)
    with postgresql() as pg, tracking_server(pg.url("mlflow"), tmp_path / "artifacts") as server:
        sweep = {
            "study": "team",
            "baseline": "round-2",
            "trials": TRIALS,
            "storage": pg.url("optuna"),
            "fixed": {"train.num_epochs": 2, "train.lr_milestones": [1], "train.patience": 2},
            "space": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
            "sampler": {"kind": "random", "seed": 1},
            "pruner": {"kind": "none"},
        }
        (first / "sweeps" / "team.yaml").write_text(yaml.safe_dump(sweep))
        # the same search from one machine with the same total workers, for the wall-time comparison
        (first / "sweeps" / "solo.yaml").write_text(yaml.safe_dump({**sweep, "study": "solo"}))
        run(["git", "add", "-A"], first)
        run(["git", "commit", "-qm", "team sweep"], first)
        run(["git", "remote", "add", "origin", str(origin)], first)
        run(["git", "push", "-q", "origin", "main"], first)
        second = machine(origin, tmp_path / "second")
        shared = {"MLFLOW_TRACKING_URI": server}
        cmd = [sys.executable, "-m", "cifar_rounds.search.sweep", "sweeps/team.yaml", "--workers", "1"]
        push = ["--push", "origin"]  # each trial to the team's git remote, its files to the DVC remote
        started = time.time()
        drivers = [
            subprocess.Popen(
                cmd + push,
                cwd=m,
                env=env(**shared),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for m in (first, second)
        ]
        try:
            outs = [d.communicate(timeout=1500)[0] for d in drivers]
        finally:
            for d in drivers:
                if d.poll() is None:
                    os.killpg(d.pid, signal.SIGKILL)
        assert [d.returncode for d in drivers] == [0, 0], "\n".join(o[-2000:] for o in outs)
        print(f"two machines, one worker each: the study's {TRIALS} trials in {time.time() - started:.0f} s")

        study = optuna.load_study(study_name="team", storage=pg.url("optuna"))
        counted = [t for t in study.trials if not t.user_attrs.get("surplus")]  # both asked for the last place
        assert len(counted) == TRIALS and all(t.state.name == "COMPLETE" for t in counted)  # the budget, across both
        on = {
            m.name: [n for n in range(TRIALS) if f"trial {n} (team-t{n:03d}) complete" in o]
            for m, o in zip((first, second), outs)
        }
        assert sorted(on["first"] + on["second"]) == list(range(TRIALS)), outs  # each trial run on one machine
        print("trials per machine:", on)
        started = time.time()
        run([*cmd[:3], "sweeps/solo.yaml", "--workers", "2"], first, **shared)
        solo = optuna.load_study(study_name="solo", storage=pg.url("optuna"))
        assert [t.state.name for t in solo.trials] == ["COMPLETE"] * TRIALS
        print(f"one driver, two workers: the study's {TRIALS} trials in {time.time() - started:.0f} s")
        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("cifar-rounds").experiment_id
        runs = [r for r in client.search_runs([experiment], "tags.sweep = 'team'") if "sweep.trial" in r.data.tags]
        numbers = sorted(int(r.data.tags["sweep.trial"]) for r in runs)
        assert numbers == sorted(t.number for t in counted)  # each trial one run, none run twice
        assert {r.info.status for r in runs} == {"FINISHED"}

        # a round on each machine, shared through the remotes and compared on a third
        for m, preset in ((first, "round-1"), (second, "round-2")):
            run(
                [sys.executable, "-m", "cifar_rounds.analysis.rounds", "run", preset, "--seeds", "1", "--epochs", "2"],
                m,
                **shared,
            )
            run(["dvc", "exp", "push", "origin", f"{preset}-s0"], m)
        third = machine(origin, tmp_path / "third")
        run(["dvc", "exp", "pull", "origin", "round-1-s0", "round-2-s0"], third)
        # every trial of both machines, through the team's remotes, its trained model with it
        trials = [f"team-t{n:03d}" for n in range(TRIALS)]
        run(["dvc", "exp", "pull", "origin", *trials], third)
        assert set(trials) <= set(run(["dvc", "exp", "ls", "--name-only", "-A"], third).stdout.split())
        run(["dvc", "exp", "apply", trials[-1]], third)
        assert (third / "models" / "best.pt").stat().st_size > 0
        run(["git", "checkout", "--", "."], third)
        run([sys.executable, "-m", "cifar_rounds.analysis.report", "round-1", "round-2"], third, **shared)
        # each round's replicate reached the third machine (its stdout names the rounds whatever it found)
        text = (third / "reports" / "round-round-1-vs-round-2.md").read_text()
        assert "Seeds: 1 (round-1-s0)" in text and "Seeds: 1 (round-2-s0)" in text, text[:2000]
        # and the shared store: the report is logged to the run the second machine trained
        (candidate,) = client.search_runs([experiment], "tags.round = 'round-2'")
        logged = {a.path for a in client.list_artifacts(candidate.info.run_id, "report")}
        assert logged == {"report/round-round-1-vs-round-2.md", "report/round-round-1-vs-round-2.png"}
        promoted = run(cmd[:4] + ["--no-run", "--promote", "team-best"], third, **shared)
        assert (third / "rounds" / "team-best.yaml").exists(), promoted.stdout[-2000:]
