"""Every command's file arguments: a folder, a binary or an empty file where another was expected is one line.

Each command runs as `python -m` runs it (its module as __main__, with its argv), in a
folder holding valid versions of every other file it takes, so that the bad one is what stops it.
"""

import runpy
import shutil
import sys
import warnings

import numpy as np
import pytest

from cifar_rounds.core.params import dump_params
from cifar_rounds.data.dataset import Split

from helpers import REPO, repo_params

BINARY = bytes(range(128, 256)) * 4  # not UTF-8, and no format any command reads
KINDS = ("folder", "binary", "empty")

SPLIT = "data/split.npz"
SUMMARY = "reports/summary.json"
TRAIN = ["--split", SPLIT, "--models", "models", "--history", "reports/h.csv", "--summary", "reports/s.json"]
EVALUATE = ["--split", SPLIT, "--models", "models", "--summary", SUMMARY, "--metrics", "m.json"]
EVALUATE += ["--predictions", "reports/p.csv", "--confusion-png", "reports/c.png", "--conditions", "reports/rc.json"]
SPLIT_ARGS = ["--raw", "data/raw", "--out", "data/out.npz"]

# (command, its arguments, the file it is given, the kinds of file it must refuse there)
CASES = [
    ("cifar_rounds.cli.check", ["p.yaml"], "p.yaml", KINDS),
    ("cifar_rounds.analysis.rounds", ["show", "bad"], "rounds/bad.yaml", KINDS),
    ("cifar_rounds.analysis.rounds", ["run", "bad"], "rounds/bad.yaml", KINDS),
    ("cifar_rounds.analysis.report", ["a", "b", "--out", "r.md"], "r.md", ("folder",)),
    ("cifar_rounds.data.synthetic", ["--out", "a.tar.gz"], "a.tar.gz", ("folder",)),
    ("cifar_rounds.stages.download", ["--out", "data/raw2"], "data/raw2", ("binary", "empty")),
    ("cifar_rounds.stages.split", SPLIT_ARGS, "data/raw", ("binary", "empty")),
    ("cifar_rounds.stages.split", SPLIT_ARGS, "data/out.npz", ("folder",)),
    ("cifar_rounds.stages.train", TRAIN, SPLIT, KINDS),
    ("cifar_rounds.stages.train", TRAIN, "models", ("binary", "empty")),
    ("cifar_rounds.stages.train", TRAIN, "reports/h.csv", ("folder",)),
    ("cifar_rounds.stages.train", TRAIN, "reports/s.json", ("folder",)),
    ("cifar_rounds.stages.evaluate", EVALUATE, SPLIT, KINDS),
    ("cifar_rounds.stages.evaluate", EVALUATE, "models", ("binary", "empty")),
    ("cifar_rounds.stages.evaluate", EVALUATE, SUMMARY, KINDS),
    ("cifar_rounds.stages.evaluate", EVALUATE, "m.json", ("folder",)),
    ("cifar_rounds.stages.evaluate", EVALUATE, "reports/p.csv", ("folder",)),
    ("cifar_rounds.stages.evaluate", EVALUATE, "reports/c.png", ("folder",)),
    ("cifar_rounds.stages.evaluate", EVALUATE, "reports/rc.json", ("folder",)),
    ("cifar_rounds.cli.demo", ["--dir", "demo"], "demo", ("binary", "empty")),
]
# and the params file each command reads from the working folder
CASES += [
    (module, args, "params.yaml", KINDS)
    for module, args in (
        ("cifar_rounds.analysis.rounds", ["show", "round-1"]),
        ("cifar_rounds.analysis.report", ["a", "b"]),
        ("cifar_rounds.stages.download", ["--out", "data/raw2"]),
        ("cifar_rounds.stages.split", SPLIT_ARGS),
        ("cifar_rounds.stages.train", TRAIN),
        ("cifar_rounds.stages.evaluate", EVALUATE),
        ("cifar_rounds.cli.demo", ["--dir", "demo"]),
    )
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Valid versions of every file the commands take."""
    dump_params(repo_params(), tmp_path / "params.yaml")
    dump_params(repo_params(), tmp_path / "p.yaml")
    shutil.copytree(REPO / "rounds", tmp_path / "rounds")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    images, labels = np.zeros((10, 3, 32, 32), np.uint8), np.arange(10, dtype=np.int64)
    Split(images, labels, images, labels, images, labels, [str(i) for i in range(10)]).save(tmp_path / SPLIT)
    (tmp_path / "reports").mkdir()
    (tmp_path / SUMMARY).write_text('{"best_epoch": 1, "stopped_epoch": 1, "mlflow_run_id": "x"}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make(path, kind: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "folder":
        path.mkdir(parents=True)
    else:
        path.write_bytes(BINARY if kind == "binary" else b"")


def run_main(module: str, args: list[str], monkeypatch, capsys) -> tuple[int | str, str]:
    """The command as `python -m module args` runs it: its exit code and its stderr (anything else raised fails
    the test)."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before, as a module
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    code = stop.value.code
    # a message given to SystemExit is what the interpreter prints on the way out
    return code, capsys.readouterr().err + (f"{code}\n" if isinstance(code, str) else "")


@pytest.mark.parametrize(
    ("module", "args", "path", "kind"),
    [pytest.param(m, a, p, k, id=f"{m.rsplit('.', 1)[1]}-{a[0]}-{p}-{k}") for m, a, p, kinds in CASES for k in kinds],
)
def test_a_file_argument_of_the_wrong_kind_is_one_line_naming_it(
    workdir, monkeypatch, capsys, module, args, path, kind
):
    make(workdir / path, kind)
    code, err = run_main(module, args, monkeypatch, capsys)
    assert code not in (0, None) and err.count("\n") == 1, err
    assert path in err and "expected" in err, err
    assert "Traceback" not in err


def test_an_empty_batches_folder_is_one_line_naming_it(workdir, monkeypatch, capsys):
    code, err = run_main("cifar_rounds.stages.split", SPLIT_ARGS, monkeypatch, capsys)
    assert code == 1
    assert err.count("\n") == 1 and "data/raw/cifar-10-batches-py: not the CIFAR-10 batches" in err, err
