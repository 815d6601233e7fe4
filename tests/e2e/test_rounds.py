"""The seed's two rounds as DVC experiments, compared by DVC, MLflow and the round report."""

import csv
import io
import json
import re
import shlex
import statistics

import dvc.api
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_rounds.analysis.proposals import proposals
from cifar_rounds.analysis.replicates import ArtifactPaths, find_round, mlflow_replicate, mlflow_runs
from cifar_rounds.analysis.rounds import load_preset
from cifar_rounds.core.names import CHECKPOINT_ARTIFACTS
from cifar_rounds.core.params import load_params
from cifar_rounds.data.synthetic import write_archive
from cifar_rounds.search.spec import load_sweep

from helpers import SEED_CHANGES, make_project, run

# the module's rounds (3 seeds each of two rounds) are trained once, inside the first test's time
pytestmark = pytest.mark.timeout(2700)
SEEDS = 3  # @champion moves only with 3 distinct seeds per side
EPOCHS = 3
LAX_CRITERIA = {"report.min_test_accuracy": 0.0, "report.max_train_test_gap": 1.0, "report.max_val_loss_rise": 1000.0}
# round-2 stops early, before its last milestone (epoch 2 of 3): patience 1, and a min_delta that no epoch's val_loss
# beats (a 10-class cross-entropy starts near ln 10 = 2.3). Its report then proposes a longer patience, by
# construction, with a sweep file that the loop test runs; both rounds still differ in all seven values
EARLY_STOP = ["-S", "train.patience=1", "-S", "train.min_delta=10"]


@pytest.fixture(scope="module")
def rounds_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    archive = tmp / "small.tar.gz"
    md5 = write_archive(archive, train_size=300, test_size=100, seed=2)
    # criteria a tiny round passes, so that @champion moves by the report end to end
    project = make_project(
        tmp / "p", (archive, md5), **{"data.val_size": 50, "model.width": 8, "train.lr_milestones": [1], **LAX_CRITERIA}
    )
    for preset, overrides in (("round-1", []), ("round-2", EARLY_STOP)):
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
                *overrides,
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
    assert set(diff["params.yaml"]) == SEED_CHANGES - {"train.num_epochs"} | {"tracking.round", "tracking.preset"}
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
    assert sorted((r.data.tags["round"], r.data.tags["seed"], r.data.tags["planned_seeds"]) for r in found) == [
        (p, str(s), str(SEEDS)) for p in ("round-1", "round-2") for s in range(SEEDS)
    ]
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], rounds_project).stdout
    assert all(name in shown for name in replicas("round-1") + replicas("round-2"))


def _metrics(project, rev):
    return json.loads(dvc.api.read("metrics.json", repo=str(project), rev=rev))


def aliases_of(project) -> dict[str, str]:
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    name = load_params(project / "params.yaml").tracking.registered_model
    return dict(client.get_registered_model(name).aliases)


@pytest.mark.slow
def test_report_over_seeds_comes_from_the_replicates_measurements(rounds_project, monkeypatch):
    before = aliases_of(rounds_project)
    run(["python", "-m", "cifar_rounds.analysis.report", "round-1", "round-2"], rounds_project)
    assert aliases_of(rounds_project) == before  # read-only: it says where they should point, moves none
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
    assert f"Seeds: {SEEDS} ({', '.join(replicas('round-1'))})" in report
    assert "cover training randomness" in report and "test-set sampling" in report  # the variance sources, named
    assert re.search(r"difference in mean test accuracy [+-]\d+\.\d+% \(95% interval", report)
    assert "Success criteria (mean over distinct seeds" in report and "test accuracy > 0.00%" in report
    assert "- alpha (significance of the verdict): 0.05" in report  # the policy that decides, printed
    assert (
        "## Registered model cifar-rounds-resnet18: aliases (read-only: `--move-aliases` applies this plan)" in report
    )
    conditions = json.loads(dvc.api.read("reports/run_conditions.json", repo=str(rounds_project), rev="round-1-s0"))
    assert f"- precision: {conditions['precision']}\n" in report and "(changed)" not in report  # same machine
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(m2[0]["mlflow_run_id"], "report")}
    assert artifacts == {"report/round-round-1-vs-round-2.md", "report/round-round-1-vs-round-2.png"}

    monkeypatch.chdir(rounds_project)  # the next round: what the candidate's measurements propose, and files to run
    cand = find_round("round-2", load_params(), rounds_project, ArtifactPaths.from_dvc(rounds_project))
    section = report.split("## Next round (after round-2)")[1].split("## Learning curves")[0]
    for proposal in proposals(cand, load_params(rounds_project / "params.yaml").report):
        assert proposal.evidence in section
        next_file = rounds_project / "reports/round-round-1-vs-round-2.next" / f"{proposal.slug}.yaml"
        load_sweep(next_file, load_params(), load_preset)
    assert bool(proposals(cand, load_params(rounds_project / "params.yaml").report)) != ("No proposal" in section)


@pytest.mark.slow
def test_move_aliases_moves_round_aliases_to_best_seeds_by_validation_and_decides_the_champion(rounds_project):
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    name = load_params(rounds_project / "params.yaml").tracking.registered_model
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted((v.tags["round"], v.tags["seed"], v.tags["dvc_exp_name"]) for v in versions) == [
        (p, str(s), f"{p}-s{s}") for p in ("round-1", "round-2") for s in range(SEEDS)
    ]  # one per training run
    decisions = f"test_set_decisions.{_metrics(rounds_project, 'round-1-s0')['test_set_digest']}"

    def champion_after(base: str, cand: str, new: bool) -> str:
        """The report's @champion line, checked against where the alias now is and what the command printed; `new`:
        the first decision of this comparison on the test set, which counts it (a report run again does not)."""
        count = int(client.get_registered_model(name).tags.get(decisions, 0))
        out = run(
            [
                "python",
                "-m",
                "cifar_rounds.analysis.report",
                base,
                cand,
                "--out",
                "reports/aliases.md",
                "--move-aliases",
            ],
            rounds_project,
        ).stdout
        report = (rounds_project / "reports/aliases.md").read_text()
        line = next(x for x in report.splitlines() if x.startswith("- @champion"))
        model = client.get_registered_model(name)
        held = model.aliases.get("champion")
        assert line.startswith(
            f"- @champion -> version {held} "
            if line.startswith("- @champion ->")
            else f"- @champion stays at version {held}: "
        ), line
        assert (f"moved {name}@champion -> version {held}" in out) == line.startswith("- @champion ->"), out
        assert int(model.tags[decisions]) == count + new  # each comparison counted once against the test set
        assert f"has decided {count + new} comparison(s) of {name}; this one is " in report
        return line

    # no champion (an earlier report of these rounds may have set one): round-1, the baseline, is the incumbent and
    # takes it; round-2 takes it only when the verdict, at this comparison's share of alpha, says it beats round-1
    if "champion" in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, "champion")
    line = champion_after("round-1", "round-2", new=True)
    report = (rounds_project / "reports/aliases.md").read_text()
    for preset in ("round-1", "round-2"):
        best = max((_metrics(rounds_project, r) for r in replicas(preset)), key=lambda m: m["val_accuracy"])
        assert client.get_model_version_by_alias(name, preset).run_id == best["mlflow_run_id"]
        assert f"- @{preset} " in report
    best = {p: client.get_model_version_by_alias(name, p).version for p in ("round-1", "round-2")}
    difference, p, alpha = re.search(r"\(difference ([+-][\d.]+)%, p = ([\d.e-]+), alpha = ([\d.e-]+)\)", line).groups()
    assert float(alpha) <= 0.025  # half of alpha or less: its share, however many comparisons came before
    crowned = "round-2" if float(p) < float(alpha) and float(difference) > 0 else "round-1"
    assert line.startswith(
        f"- @champion -> version {best[crowned]} (was no version): there was no champion; {crowned} takes it: "
    ), line
    assert "better round" not in report
    # again: the champion stays with its round's best seed, and the comparison is not counted again
    assert champion_after("round-1", "round-2", new=False).startswith(f"- @champion stays at version {best[crowned]}: ")
    # the other round challenges: the champion moves exactly when the configuration verdict says so
    other = "round-1" if crowned == "round-2" else "round-2"
    line = champion_after(crowned, other, new=False)  # the same comparison, either way round
    moved = line.startswith("- @champion ->")
    assert moved == (f"its configuration beats {crowned}, the champion's round" in line), line
    assert client.get_model_version_by_alias(name, "champion").version == best[other if moved else crowned]
    holder = other if moved else crowned

    # the version @holder and @champion point at is deleted: its round's next best seed takes both, named as such
    gone = client.get_model_version_by_alias(name, holder)
    client.delete_model_version(name, gone.version)
    line = champion_after("round-1", "round-2", new=False)
    report = (rounds_project / "reports/aliases.md").read_text()
    seed = next(r for r in replicas(holder) if _metrics(rounds_project, r)["mlflow_run_id"] == gone.run_id)
    assert f"better by validation, but {seed}'s version was deleted" in report
    assert f"(was no version (version {gone.version} was the champion and has been deleted))" in line, line
    assert client.get_model_version_by_alias(name, "champion").run_id in {
        _metrics(rounds_project, r)["mlflow_run_id"] for r in replicas(holder)
    }
    assert "registered no version" not in report

    # a champion from a round this report does not compare stays where it is
    location = client.get_logged_model(versions[0].source.removeprefix("models:/")).artifact_location
    elsewhere = client.create_model_version(name, location)  # no run: as if registered from elsewhere
    client.set_registered_model_alias(name, "champion", elsewhere.version)
    run(
        [
            "python",
            "-m",
            "cifar_rounds.analysis.report",
            "round-1",
            "round-2",
            "--out",
            "reports/aliases.md",
            "--move-aliases",
        ],
        rounds_project,
    )
    assert client.get_model_version_by_alias(name, "champion").version == elsewhere.version
    assert f"- @champion stays at version {elsewhere.version}: " in (rounds_project / "reports/aliases.md").read_text()


@pytest.mark.slow
def test_rounds_whose_registered_model_is_not_the_champions_are_refused(rounds_project):
    client = MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    name = load_params(rounds_project / "params.yaml").tracking.registered_model
    some = next(v for v in client.search_model_versions(f"name = '{name}'") if v.source.startswith("models:/"))
    if not client.search_registered_models("name = 'other-model'"):
        client.create_registered_model("other-model")
    location = client.get_logged_model(some.source.removeprefix("models:/")).artifact_location
    champion = client.create_model_version("other-model", location)
    client.set_registered_model_alias("other-model", "champion", champion.version)
    params = rounds_project / "params.yaml"
    before = params.read_bytes()
    params.write_text(before.decode().replace(f"registered_model: {name}", "registered_model: other-model"))
    try:
        result = run(
            ["python", "-m", "cifar_rounds.analysis.report", "round-1", "round-2", "--move-aliases"],
            rounds_project,
            check=False,
        )
    finally:
        params.write_bytes(before)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"the rounds registered under {name}, but the champion lives under other-model" in result.stderr
    assert client.get_model_version_by_alias("other-model", "champion").version == champion.version


@pytest.mark.slow
def test_one_seed_each_is_a_comparison_of_two_models_not_of_configurations(rounds_project):
    run(
        ["python", "-m", "cifar_rounds.analysis.report", "round-1-s0", "round-2-s0", "--out", "reports/one.md"],
        rounds_project,
    )
    report = (rounds_project / "reports/one.md").read_text()
    assert "McNemar" in report and "configuration" in report and "seeds" in report
    assert re.search(
        r"the trained models round-1-s0 and round-2-s0 (differ|do not differ distinguishably) on these", report
    )
    assert "the configuration change from" not in report
    # round-1-s0 is one replicate of a round planned with 3 seeds: no alias moves on it
    assert "no alias moves until both rounds have their planned seeds" in report


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
def test_a_failed_or_refused_round_leaves_params_yaml_byte_for_byte_and_names_force(rounds_project):
    rounds = ["python", "-m", "cifar_rounds.analysis.rounds", "run", "round-1"]
    before = (rounds_project / "params.yaml").read_bytes()
    # a finished experiment of that name, of another round: refused before DVC starts
    result = run([*rounds, "-n", "round-1-s0", "--epochs", "3"], rounds_project, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: round-1-s0: a finished experiment of this name ran other values")
    assert "(tracking.round); add --force to replace it" in result.stderr
    # DVC fails (the download stage cannot find the archive)
    result = run(
        [*rounds, "-n", "r1-broken", "--epochs", "3", "-S", "data.url=/no/such.tar.gz"], rounds_project, check=False
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: dvc exp run failed for r1-broken")
    assert "params.yaml is as it was" in result.stderr
    assert (rounds_project / "params.yaml").read_bytes() == before


@pytest.mark.slow
def test_overrides_force_and_queue_work_as_the_readme_shows(rounds_project):
    rounds = ["python", "-m", "cifar_rounds.analysis.rounds", "run"]
    short = ["-S", "train.num_epochs=2", "-S", "train.lr_milestones=[1]", *EARLY_STOP]  # round-2's, and shorter
    run([*rounds, "round-2", *short, "-n", "r2-short"], rounds_project)
    shown = json.loads(run(["dvc", "params", "diff", "round-2-s0", "r2-short", "--json"], rounds_project).stdout)
    # only what -S changed, and the round (its name, no planned seeds): the seed is 0 again, not the last
    # replicate's (round-2-s1 ran last)
    assert set(shown["params.yaml"]) == {
        "train.num_epochs",
        "train.lr_milestones",
        "tracking.round",
        "tracking.planned_seeds",
    }
    assert (
        shown["params.yaml"]["train.num_epochs"]["new"] == 2
        and shown["params.yaml"]["train.lr_milestones"]["new"] == "[1]"
    )
    before = run(["dvc", "exp", "show", "--json"], rounds_project).stdout.count('"r2-short"')
    run([*rounds, "round-2", *short, "-n", "r2-short", "--force"], rounds_project)  # replaced, not refused
    assert run(["dvc", "exp", "show", "--json"], rounds_project).stdout.count('"r2-short"') == before
    run([*rounds, "round-2", "--seeds", "2", "--queue", "--epochs", "2", "-n", "r2q"], rounds_project)
    status = run(["dvc", "queue", "status"], rounds_project).stdout
    assert "r2q-s0" in status and "r2q-s1" in status and status.count("Queued") == 2
    run(["dvc", "queue", "remove", "--queued"], rounds_project)  # not started: nothing else to stop


def moves_as_printed(project, args: list[str]) -> str:
    """Run the report with --move-aliases; the aliases must have moved exactly as it printed. Its stdout."""
    before = aliases_of(project)
    out = run(["python", "-m", "cifar_rounds.analysis.report", *args, "--move-aliases"], project).stdout
    name = load_params(project / "params.yaml").tracking.registered_model
    moved = {a: int(v) for a, v in re.findall(rf"^moved {re.escape(name)}@(\S+) -> version (\d+)$", out, re.M)}
    assert aliases_of(project) == {**before, **moved}, out
    return out


def champion_line_holds(project, report: str) -> str:
    """The report's @champion line, checked against where the alias is now."""
    line = next(x for x in report.splitlines() if x.startswith("- @champion"))
    held = aliases_of(project).get("champion")
    if line.startswith("- @champion ->"):
        assert line.startswith(f"- @champion -> version {held} "), line
    else:
        assert line.startswith(f"- @champion stays at {f'version {held}' if held else 'no version'}"), line
    return line


@pytest.mark.slow
def test_the_readme_loop_runs_on_the_files_the_report_writes_as_written(rounds_project):
    """report -> proposals -> sweep -> promote -> replicate -> report -> champion, as the README describes it."""
    project, client = rounds_project, MlflowClient(f"sqlite:///{rounds_project}/mlflow.db")
    name = load_params(project / "params.yaml").tracking.registered_model
    if "champion" in aliases_of(project):  # the loop starts with no champion, whatever an earlier report did
        client.delete_registered_model_alias(name, "champion")

    # the report: @champion to the better round, and the proposals' sweep files, of 2 trials each
    moves_as_printed(project, ["round-1", "round-2", "--sweep-trials", "2"])
    report = (project / "reports/round-round-1-vs-round-2.md").read_text()
    assert champion_line_holds(project, report).startswith("- @champion -> version ")  # crowned
    section = report.split("## Next round (after round-2)")[1]
    # round-2 stopped early (EARLY_STOP): the patience proposal, and the command that runs its file
    command = re.search(r"search: `(cifar-rounds sweep \S+/patience\.yaml)`", section).group(1)
    sweep_file = project / command.split()[-1]
    written = sweep_file.read_bytes()
    spec = yaml.safe_load(written)
    assert (spec["trials"], spec["baseline"], spec["enqueue"]) == (2, "round-2", ["round-2"])
    # the trials are round-2 as it ran: its shortened schedule and early-stop values fixed, patience searched
    assert spec["fixed"] == {"train.num_epochs": 3, "train.lr_milestones": [1, 2], "train.min_delta": 10.0}
    assert spec["space"]["train.patience"]["low"] <= 1 and spec["space"]["train.patience"]["high"] >= 35

    # the sweep, by the command the report printed: its file as written
    run(shlex.split(command), project)
    assert sweep_file.read_bytes() == written
    study = optuna.load_study(study_name=spec["study"], storage=f"sqlite:///{project}/optuna.db")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2 and any(t.state.name == "COMPLETE" for t in finished)
    assert [t for t in study.trials if t not in finished] == []  # nothing failed, nothing retried
    for t in finished:
        exp = f"{spec['study']}-t{t.number:03d}"
        ran_with = yaml.safe_load(dvc.api.read("params.yaml", repo=str(project), rev=exp))
        ran = ran_with["train"]
        assert (ran["patience"], ran["num_epochs"], ran["min_delta"]) == (t.params["train.patience"], 3, 10.0)
        # the rounds log their models (tracking.log_model), a trial its checkpoints only: no version per trial
        assert ran_with["tracking"]["log_model"] is False and load_params(project / "params.yaml").tracking.log_model
        trial_run = json.loads(dvc.api.read("reports/train_summary.json", repo=str(project), rev=exp))["mlflow_run_id"]
        assert [a.path for a in client.list_artifacts(trial_run, CHECKPOINT_ARTIFACTS)] != []
        assert client.search_model_versions(f"name = '{name}' AND run_id = '{trial_run}'") == []
        history = list(csv.DictReader(io.StringIO(dvc.api.read("reports/history.csv", repo=str(project), rev=exp))))
        assert [int(row["epoch"]) for row in history] == sorted(t.intermediate_values)  # trained what it reported
        if t.state.name == "COMPLETE":  # the objective: validation accuracy at the epoch a round would evaluate
            summary = json.loads(dvc.api.read("reports/train_summary.json", repo=str(project), rev=exp))
            best = summary["best_epoch"]
            assert t.value == pytest.approx(float(history[best - 1]["val_accuracy"]))
    assert (project / f"reports/sweep-{spec['study']}.md").exists()

    # promoted: the best COMPLETE trial's searched value on round-2 as it ran (the sweep's fixed values)
    out = run([*shlex.split(command), "--no-run", "--promote", "round-3"], project).stdout
    best = study.trials[int(re.search(r"^sweep: promoted trial (\d+) to rounds/round-3\.yaml", out, re.M).group(1))]
    assert best.state.name == "COMPLETE"
    assert best.value == max(t.value for t in study.trials if t.state.name == "COMPLETE")
    promoted = yaml.safe_load((project / "rounds/round-3.yaml").read_text())
    round_2 = yaml.safe_load((project / "rounds/round-2.yaml").read_text())
    ran = {"num_epochs": 3, "lr_milestones": [1, 2], "min_delta": 10.0}
    assert promoted == {"train": {**round_2["train"], **ran, "patience": best.params["train.patience"]}}

    # replicated with the earlier rounds' short schedule, then compared: the aliases move as the report says
    replicate = ["python", "-m", "cifar_rounds.analysis.rounds", "run", "round-3", "--seeds", str(SEEDS)]
    before = (project / "params.yaml").read_bytes()
    run([*replicate, "--epochs", str(EPOCHS), "--workers", "2"], project)  # two at once, each in a clone
    assert (project / "params.yaml").read_bytes() == before
    assert len({_metrics(project, r)["mlflow_run_id"] for r in replicas("round-3")}) == SEEDS  # each saved here
    moves_as_printed(project, ["round-2", "round-3"])
    report = (project / "reports/round-round-2-vs-round-3.md").read_text()
    # round-3 is round-2 as it ran, early stop included, with the searched patience: nothing else changes
    assert set(re.findall(r"^\| `([\w.]+)` \|", report, re.M)) <= {"train.patience"}, report
    best_seed = max((_metrics(project, r) for r in replicas("round-3")), key=lambda m: m["val_accuracy"])
    assert client.get_model_version_by_alias(name, "round-3").run_id == best_seed["mlflow_run_id"]
    # the champion's round against round-3: round-2's, or round-1's as the report then advises
    holder = next(r for r in ("round-1", "round-2") if aliases_of(project)[r] == aliases_of(project)["champion"])
    line = champion_line_holds(project, report)
    if holder == "round-1":
        assert "report the champion's round against round-3" in line, line
        moves_as_printed(project, ["round-1", "round-3"])
        line = champion_line_holds(project, (project / "reports/round-round-1-vs-round-3.md").read_text())
    assert f"{holder}, the champion's round" in line or "round-3 does not pass" in line, line  # decided on the verdict
    assert (aliases_of(project)["champion"] == aliases_of(project)["round-3"]) == line.startswith("- @champion ->")
