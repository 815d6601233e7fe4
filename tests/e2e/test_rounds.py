"""The seed's two rounds as DVC experiments, compared by DVC, MLflow and the round report."""

import json
import re
import statistics

import dvc.api
import pytest
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.proposals import proposals
from cifar_rounds.analysis.replicates import ArtifactPaths, find_round, mlflow_replicate, mlflow_runs
from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.params import load_params
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.spec import load_sweep

from helpers import SEED_CHANGES, make_project, run

SEEDS = 2
EPOCHS = 3
LAX_CRITERIA = {"report.min_test_accuracy": 0.0, "report.max_train_test_gap": 1.0, "report.max_val_loss_rise": 1000.0}


@pytest.fixture(scope="module")
def rounds_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    archive = tmp / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=2)
    # criteria a tiny round passes, so that @champion moves by the report end to end
    project = make_project(
        tmp / "p", (archive, md5), **{"data.val_size": 50, "model.width": 8, "train.lr_milestones": [1], **LAX_CRITERIA}
    )
    for preset in ("round-1", "round-2"):
        run(
            [
                "python",
                "-m",
                "cifar_rounds.analysis.rounds",
                "run",
                preset,
                "--seeds",
                str(SEEDS),
                "--epochs",
                str(EPOCHS),
            ],
            project,
        )
    return project


def replicas(preset: str) -> list[str]:
    return [f"{preset}-s{seed}" for seed in range(SEEDS)]


@pytest.mark.slow
def test_dvc_compares_the_two_rounds(rounds_project):
    diff = json.loads(run(["dvc", "params", "diff", "round-1-s0", "round-2-s0", "--json"], rounds_project).stdout)
    # --epochs 3 gives both rounds 3 epochs (and milestones [1, 2]): the founding analysis's six other changes remain
    assert set(diff["params.yaml"]) == SEED_CHANGES - {"train.num_epochs"} | {"tracking.round"}
    assert diff["params.yaml"]["train.learning_rate"]["old"] == 0.01
    assert diff["params.yaml"]["train.learning_rate"]["new"] == 0.05
    seeds = json.loads(run(["dvc", "params", "diff", "round-2-s0", "round-2-s1", "--json"], rounds_project).stdout)
    assert set(seeds["params.yaml"]) == {"train.seed"}  # replicates differ in their seed only
    # --all: tiny rounds can tie on test accuracy, and a plain diff lists changed values only
    metrics = json.loads(
        run(["dvc", "metrics", "diff", "round-1-s0", "round-2-s0", "--all", "--json"], rounds_project).stdout
    )
    accuracy = metrics["metrics.json"]["test_accuracy"]
    assert (accuracy["old"], accuracy["new"]) == tuple(
        _metrics(rounds_project, r)["test_accuracy"] for r in ("round-1-s0", "round-2-s0")
    )
    plots = run(["dvc", "plots", "diff", "round-1-s0", "round-2-s0", "--json"], rounds_project).stdout
    assert "round-1-s0" in plots and "round-2-s0" in plots
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    exp = client.get_experiment_by_name("cifar-rounds")
    found = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in found) == replicas("round-1") + replicas("round-2")
    assert sorted((r.data.tags["round"], r.data.tags["seed"]) for r in found) == [
        (p, str(s)) for p in ("round-1", "round-2") for s in range(SEEDS)
    ]
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], rounds_project).stdout
    assert all(name in shown for name in replicas("round-1") + replicas("round-2"))


def _metrics(project, rev):
    return json.loads(dvc.api.read("metrics.json", repo=str(project), rev=rev))


@pytest.mark.slow
def test_report_over_seeds_comes_from_the_replicates_measurements(rounds_project, monkeypatch):
    run(["python", "-m", "cifar_rounds.analysis.report", "round-1", "round-2"], rounds_project)
    report = (rounds_project / "reports/round-round-1-vs-round-2.md").read_text()
    assert (rounds_project / "reports/round-round-1-vs-round-2.png").read_bytes()[:4] == b"\x89PNG"
    m1, m2 = ([_metrics(rounds_project, r) for r in replicas(p)] for p in ("round-1", "round-2"))
    acc = lambda ms: (statistics.mean(m["test_accuracy"] for m in ms), statistics.stdev(m["test_accuracy"] for m in ms))  # noqa: E731
    (a_mean, a_std), (b_mean, b_std) = acc(m1), acc(m2)
    assert (
        f"- Test accuracy: {a_mean:.2%} ± {a_std:.2%} (n = {SEEDS}) -> {b_mean:.2%} ± {b_std:.2%} (n = {SEEDS})"
        in report
    )
    changed = set(re.findall(r"^\| `([\w.]+)` \|", report, re.M))
    assert changed == SEED_CHANGES - {"train.num_epochs"}
    assert f"Seeds: {SEEDS} (round-1-s0, round-1-s1)" in report
    assert "cover training randomness" in report and "test-set sampling" in report  # the variance sources, named
    assert re.search(r"difference in mean test accuracy [+-]\d+\.\d+% \(95% interval", report)
    assert "Success criteria (mean over seeds" in report and "test accuracy > 0.00%" in report
    assert f"- precision: {m1[0]['precision']}\n" in report and "(changed)" not in report  # same machine
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(m2[0]["mlflow_run_id"], "report")}
    assert artifacts == {"report/round-round-1-vs-round-2.md", "report/round-round-1-vs-round-2.png"}

    monkeypatch.chdir(rounds_project)  # the next round: what the candidate's measurements propose, and files to run
    cand = find_round("round-2", load_params(), rounds_project, ArtifactPaths.from_dvc(rounds_project))
    section = report.split("## Next round (after round-2)")[1].split("## Learning curves")[0]
    for proposal in proposals(cand):
        assert proposal.evidence in section
        next_file = rounds_project / "reports/round-round-1-vs-round-2.next" / f"{proposal.slug}.yaml"
        load_sweep(next_file, load_params(), load_preset)
    assert bool(proposals(cand)) != ("No proposal" in section)


@pytest.mark.slow
def test_the_report_moves_round_aliases_to_best_seeds_and_says_where_the_champion_is(rounds_project):
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    name = load_params(rounds_project / "params.yaml").tracking.registered_model
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted((v.tags["round"], v.tags["seed"], v.tags["dvc_exp_name"]) for v in versions) == [
        (p, str(s), f"{p}-s{s}") for p in ("round-1", "round-2") for s in range(SEEDS)
    ]  # one per training run

    def champion_after(base: str, cand: str) -> str:
        """The report's @champion line, checked against where the alias now is."""
        run(["python", "-m", "cifar_rounds.analysis.report", base, cand, "--out", "reports/aliases.md"], rounds_project)
        line = next(
            x for x in (rounds_project / "reports/aliases.md").read_text().splitlines() if x.startswith("- @champion")
        )
        held = client.get_registered_model(name).aliases.get("champion")
        assert line.startswith(
            f"- @champion -> version {held}: "
            if line.startswith("- @champion ->")
            else f"- @champion stays at version {held}: "
        ), line
        return line

    # no champion (an earlier report of these rounds may have set one), and round-2 passes its (lax)
    # criteria: it becomes the champion
    if "champion" in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, "champion")
    line = champion_after("round-1", "round-2")
    report = (rounds_project / "reports/aliases.md").read_text()
    for preset in ("round-1", "round-2"):
        best = max((_metrics(rounds_project, r) for r in replicas(preset)), key=lambda m: m["test_accuracy"])
        assert client.get_model_version_by_alias(name, preset).run_id == best["mlflow_run_id"]
        assert f"- @{preset} -> {name} version" in report
    best = {p: client.get_model_version_by_alias(name, p).version for p in ("round-1", "round-2")}
    assert (
        line
        == f"- @champion -> version {best['round-2']}: there was no champion, and round-2 passes its success criteria"
    )
    # a champion from the candidate's round follows the round's best seed
    assert "the champion already comes from round-2" in champion_after("round-1", "round-2")
    # round-1 against the champion's round: the champion moves exactly when the configuration verdict says so
    line = champion_after("round-2", "round-1")
    moved = line.startswith("- @champion ->")
    assert moved == ("its configuration beats round-2, the champion's round" in line)
    assert moved or "the configuration verdict does not say round-1 beats round-2" in line, line
    assert client.get_model_version_by_alias(name, "champion").version == best["round-1" if moved else "round-2"]
    # a champion from a round this report does not compare stays where it is
    location = client.get_logged_model(versions[0].source.removeprefix("models:/")).artifact_location
    other = client.create_model_version(name, location)  # no run: as if registered from elsewhere
    client.set_registered_model_alias(name, "champion", other.version)
    run(
        ["python", "-m", "cifar_rounds.analysis.report", "round-1", "round-2", "--out", "reports/aliases.md"],
        rounds_project,
    )
    assert client.get_model_version_by_alias(name, "champion").version == other.version
    assert f"- @champion stays at version {other.version}: " in (rounds_project / "reports/aliases.md").read_text()


@pytest.mark.slow
def test_one_seed_each_is_a_comparison_of_two_models_not_of_configurations(rounds_project):
    run(
        ["python", "-m", "cifar_rounds.analysis.report", "round-1-s0", "round-2-s0", "--out", "reports/one.md"],
        rounds_project,
    )
    report = (rounds_project / "reports/one.md").read_text()
    assert "McNemar" in report and "configuration" in report and "seeds" in report


@pytest.mark.slow
def test_a_round_can_be_read_back_from_mlflow_alone(rounds_project, monkeypatch):
    monkeypatch.chdir(rounds_project)
    params = load_params(rounds_project / "params.yaml")
    paths = ArtifactPaths.from_dvc(rounds_project)
    reps = [mlflow_replicate(params, found, paths) for found in mlflow_runs(params, "round-1")]  # tagged round-1
    assert [rep.metrics for rep in reps] == [_metrics(rounds_project, n) for n in replicas("round-1")]
    assert reps[0].params.train.learning_rate == 0.01 and len(reps[0].predictions) == 100
    assert [rep.metrics for rep in find_round("round-1", params, rounds_project, paths).replicates] == [
        rep.metrics for rep in reps
    ]  # DVC finds the same replicates


@pytest.mark.slow
def test_report_refusals_are_one_line(rounds_project):
    for args, message in (
        (["round-1", "it's"], '"it\'s" is neither'),
        (["round-1", "HEAD"], "HEAD: a revision without metrics.json"),
    ):
        result = run(["python", "-m", "cifar_rounds.analysis.report", *args], rounds_project, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_a_failed_round_leaves_params_yaml_byte_for_byte_and_names_force(rounds_project):
    before = (rounds_project / "params.yaml").read_bytes()
    result = run(
        ["python", "-m", "cifar_rounds.analysis.rounds", "run", "round-1", "-n", "round-1-s0", "--epochs", "3"],
        rounds_project,
        check=False,
    )
    assert result.returncode == 1 and "add --force to replace it" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: dvc exp run failed for round-1-s0")
    assert (rounds_project / "params.yaml").read_bytes() == before


@pytest.mark.slow
def test_overrides_force_and_queue_work_as_the_readme_shows(rounds_project):
    rounds = ["python", "-m", "cifar_rounds.analysis.rounds", "run"]
    run(
        [*rounds, "round-2", "-S", "train.num_epochs=2", "-S", "train.lr_milestones=[1]", "-n", "r2-short"],
        rounds_project,
    )
    shown = json.loads(run(["dvc", "params", "diff", "round-2-s0", "r2-short", "--json"], rounds_project).stdout)
    # only what -S changed: the seed is 0 again, not the last replicate's (round-2-s1 ran last)
    assert set(shown["params.yaml"]) == {"train.num_epochs", "train.lr_milestones"}
    assert (
        shown["params.yaml"]["train.num_epochs"]["new"] == 2
        and shown["params.yaml"]["train.lr_milestones"]["new"] == "[1]"
    )
    before = run(["dvc", "exp", "show", "--json"], rounds_project).stdout.count('"r2-short"')
    run(
        [*rounds, "round-2", "-S", "train.num_epochs=2", "-S", "train.lr_milestones=[1]", "-n", "r2-short", "--force"],
        rounds_project,
    )  # replaced, not refused
    assert run(["dvc", "exp", "show", "--json"], rounds_project).stdout.count('"r2-short"') == before
    run([*rounds, "round-2", "--seeds", "2", "--queue", "--epochs", "2", "-n", "r2q"], rounds_project)
    status = run(["dvc", "queue", "status"], rounds_project).stdout
    assert "r2q-s0" in status and "r2q-s1" in status and status.count("Queued") == 2
    run(["dvc", "queue", "remove", "--queued"], rounds_project)  # not started: nothing else to stop
