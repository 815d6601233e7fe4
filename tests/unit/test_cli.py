"""The `cifar-rounds` command: each subcommand hands its arguments, untouched, to the module that does the work.

Parsing, forwarding and messages are checked in this process; one test runs the installed entry point and
`python -m cifar_rounds` as a user would.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_rounds.cli import main as cli
from cifar_rounds.core.errors import run_stage
from cifar_rounds.core.params import dump_params, with_overrides

from helpers import BIN, REPO, repo_params


def forwarded(monkeypatch, module: str, argv: list[str]) -> tuple[list[str], str]:
    """(argv, prog) that `cifar-rounds ARGV` hands to `module`'s main()."""
    import importlib

    calls = []
    target = importlib.import_module(module)
    monkeypatch.setattr(target, "main", lambda args, prog=None: calls.append((list(args), prog)))
    cli.main(argv)
    assert len(calls) == 1, calls
    return calls[0]


def test_run_forwards_every_argument_untouched_flags_it_does_not_know_included(monkeypatch):
    argv = ["run", "round-2", "--epochs", "10", "--seeds", "3", "-S", "train.patience=4", "--workers", "2"]
    assert forwarded(monkeypatch, "cifar_rounds.analysis.rounds", argv) == (["run", *argv[1:]], "cifar-rounds")


@pytest.mark.parametrize(
    ("argv", "module", "expected"),
    [
        (
            ["report", "round-1", "round-2", "--move-aliases"],
            "cifar_rounds.analysis.report",
            (["round-1", "round-2", "--move-aliases"], "cifar-rounds report"),
        ),
        (
            ["sweep", "sweeps/round-3.yaml", "--workers", "2"],
            "cifar_rounds.search.sweep",
            (["sweeps/round-3.yaml", "--workers", "2"], "cifar-rounds sweep"),
        ),
        (
            ["promote", "sweeps/round-3.yaml", "round-3"],
            "cifar_rounds.search.sweep",
            (["sweeps/round-3.yaml", "--no-run", "--promote", "round-3"], "cifar-rounds promote"),
        ),
        (
            ["promote", "sweeps/round-3.yaml", "round-3", "--force"],
            "cifar_rounds.search.sweep",
            (["sweeps/round-3.yaml", "--no-run", "--promote", "round-3", "--force"], "cifar-rounds promote"),
        ),
        (["show", "round-1"], "cifar_rounds.analysis.rounds", (["show", "round-1"], "cifar-rounds")),
        (["show", "--headline"], "cifar_rounds.cli.headline", ([], "cifar-rounds show --headline")),
        (["demo", "--dir", "d"], "cifar_rounds.cli.demo", (["--dir", "d"], "cifar-rounds demo")),
        (["relocate"], "cifar_rounds.cli.relocate", ([], "cifar-rounds relocate")),
        (["check", "--preset", "round-2"], "cifar_rounds.cli.check", (["--preset", "round-2"], "cifar-rounds check")),
    ],
)
def test_each_command_calls_its_module_with_its_own_prog(monkeypatch, argv, module, expected):
    assert forwarded(monkeypatch, module, argv) == expected


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_the_listing_names_every_command_with_an_example(capsys):
    out = help_of([], capsys)
    assert out.startswith("usage: cifar-rounds [-h] COMMAND ...")
    for name, command in cli.COMMANDS.items():
        assert f"  {name:<9} {command.summary}\n" in out and f"  {command.example}\n" in out
        assert command.example.startswith(f"cifar-rounds {name}")


@pytest.mark.parametrize("command", ["report", "promote", "show", "check", "demo", "relocate"])
def test_each_commands_help_is_under_its_name_and_shows_an_example(command, capsys):
    out = help_of([command], capsys)
    assert out.startswith(f"usage: cifar-rounds {command} ")
    example = out.split("\nexample", 1)[1]
    assert f"  cifar-rounds {command}" in example


@pytest.mark.parametrize(
    ("command", "example"),
    [("run", "-S train.num_epochs=3"), ("sweep", "sweeps/round-3.yaml")],
)
def test_run_and_sweep_help_is_their_modules_under_the_commands_name(command, example, capsys):
    out = help_of([command], capsys)
    assert out.startswith(f"usage: cifar-rounds {command} ") and f"e.g. {example}" in " ".join(out.split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "cifar-rounds: error: a COMMAND is required: demo, run, report, sweep, promote, show, check, relocate"),
        (["rnu"], "cifar-rounds: error: argument COMMAND: invalid choice: 'rnu'"),
        (["show"], "cifar-rounds show: error: one of the arguments PRESET --headline is required"),
        (["show", "round-1", "--headline"], "cifar-rounds show: error: argument --headline: not allowed with"),
        (["promote", "sweeps/round-3.yaml"], "cifar-rounds promote: error: the following arguments are required: NAME"),
        (["run"], "cifar-rounds run: error: the following arguments are required: preset"),
    ],
)
def test_a_command_line_it_cannot_parse_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(message), err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder as the repository's root: params.yaml, the presets and the sweep file."""
    dump_params(repo_params(), tmp_path / "params.yaml")
    shutil.copytree(REPO / "rounds", tmp_path / "rounds")
    shutil.copytree(REPO / "sweeps", tmp_path / "sweeps")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """`cifar-rounds check ARGV` as the console script runs it: (exit status, stdout lines, stderr lines)."""
    with pytest.raises(SystemExit) as stopped:
        run_stage(lambda: cli.main(["check", *argv]) or sys.exit(0))
    out, err = capsys.readouterr()
    return stopped.value.code, out.splitlines(), err.splitlines()


def test_check_says_each_good_file_is_valid(workdir, capsys):
    assert check([], capsys) == (0, ["params.yaml: valid"], [])
    argv = ["params.yaml", "--preset", "round-1", "--preset", "round-2", "--sweep", "sweeps/round-3.yaml"]
    expected = ["params.yaml: valid", "rounds/round-1.yaml: valid", "rounds/round-2.yaml: valid"]
    assert check(argv, capsys) == (0, [*expected, "sweeps/round-3.yaml: valid"], [])


def test_check_prints_one_line_per_bad_file_naming_it_and_exits_1(workdir, capsys):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["train"]["learning_rat"] = raw["train"].pop("learning_rate")
    (workdir / "misspelt.yaml").write_text(yaml.safe_dump(raw))
    (workdir / "rounds" / "bad.yaml").write_text("train: {lr_gamma: 2.0}\n")
    sweep = yaml.safe_load((workdir / "sweeps" / "round-3.yaml").read_text())
    (workdir / "sweeps" / "bad.yaml").write_text(yaml.safe_dump({**sweep, "trials": 0}))
    (workdir / "sweeps" / "empty.yaml").write_text("")
    argv = ["misspelt.yaml", "missing.yaml", "params.yaml", "--preset", "bad", "--preset", "nope"]
    status, out, err = check([*argv, "--sweep", "sweeps/bad.yaml", "--sweep", "sweeps/empty.yaml"], capsys)
    assert status == 1 and out == ["params.yaml: valid"]
    assert len(err) == 6 and all(line.startswith("error: ") for line in err), err
    assert err[0].startswith("error: misspelt.yaml: ") and "did you mean train.learning_rate?" in err[0]
    assert err[1] == "error: missing.yaml: file not found"
    assert err[2].startswith("error: rounds/bad.yaml: ") and "train.lr_gamma" in err[2]
    assert err[3] == "error: rounds/nope.yaml: no such preset; presets here: bad, round-1, round-2"
    assert err[4].startswith("error: sweeps/bad.yaml: trials: ")
    assert err[5].startswith("error: sweeps/empty.yaml: empty, not a sweep file")


def test_check_of_a_sweep_reads_params_yaml_as_its_trials_would(workdir, capsys):
    """A sweep is checked on the workspace's params.yaml: where that is bad, the line names params.yaml."""
    dump_params(with_overrides(repo_params(), {"train.num_epochs": 3, "train.lr_milestones": [1]}), "params.yaml")
    (workdir / "params.yaml").write_text(
        (workdir / "params.yaml").read_text().replace("num_epochs: 3", "num_epochs: x")
    )
    status, out, err = check(["--sweep", "sweeps/round-3.yaml"], capsys)
    assert status == 1 and out == [] and len(err) == 1 and err[0].startswith("error: params.yaml: ")


def test_the_shipped_presets_and_sweep_files_pass_the_check(monkeypatch, capsys):
    """What the README and docs run: every preset of rounds/ and sweep file of sweeps/, on the repository's params."""
    monkeypatch.chdir(REPO)
    presets = sorted(p.stem for p in (REPO / "rounds").glob("*.yaml"))
    sweeps = sorted(str(p.relative_to(REPO)) for p in (REPO / "sweeps").glob("*.yaml"))
    assert "sweeps/demo.yaml" in sweeps and presets == ["round-1", "round-2"]
    argv = [f"--preset={name}" for name in presets] + [f"--sweep={path}" for path in sweeps]
    status, out, err = check(argv, capsys)
    assert (status, err) == (0, []) and len(out) == len(presets) + len(sweeps)


def test_the_console_script_and_python_m_print_the_same_help():
    installed = Path(BIN) / "cifar-rounds"
    assert installed.exists(), "run scripts/setup.sh: it installs the package with its console script"
    outputs = [
        subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
        for cmd in ([str(installed), "--help"], [sys.executable, "-m", "cifar_rounds", "--help"])
    ]
    assert outputs[0] == outputs[1] and outputs[0].startswith("usage: cifar-rounds [-h] COMMAND ...")
    assert all(f"cifar-rounds {name}" in outputs[0] for name in cli.COMMANDS)
