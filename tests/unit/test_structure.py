"""The house rules that can drift: stage dependencies, imports between modules, values declared once."""

import ast
import re
import subprocess
import sys

import pytest
import yaml

from cifar_rounds.analysis.rounds import load_preset, preset_names
from cifar_rounds.core.names import BEST_CHECKPOINT

from helpers import REPO

PACKAGE = REPO / "src" / "cifar_rounds"
STAGES = ("stages.download", "stages.split", "stages.train", "stages.evaluate")


def modules() -> set[str]:
    """Every module of the package as GROUP.MODULE (the groups' __init__ files aside)."""
    return {f"{p.parent.name}.{p.stem}" for p in PACKAGE.glob("*/*.py") if p.stem != "__init__"}


def imports_of(module: str) -> set[str]:
    """The package modules (GROUP.MODULE) that `module` imports directly."""
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.removeprefix("cifar_rounds.") for n in names if n.startswith("cifar_rounds.")}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports_of(m)
    return seen


def test_every_module_sits_in_a_group_folder():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]  # `python -m cifar_rounds`
    assert all(m.count(".") == 1 for m in modules()) and all(imports_of(m) <= modules() for m in modules())


# imports point one way: a group imports its own modules and those of lower layers only
LAYERS = {"core": 0, "data": 1, "tracking": 1, "training": 2, "analysis": 2, "search": 3, "stages": 4, "cli": 5}


def test_imports_point_down_the_layers_and_form_no_cycle():
    assert {m.split(".")[0] for m in modules()} == set(LAYERS)
    for module in modules():
        group = module.split(".")[0]
        for target in imports_of(module):
            other = target.split(".")[0]
            assert other == group or LAYERS[other] < LAYERS[group], f"{module} imports {target}, a layer up or across"
    for module in modules():
        assert not any(module in closure(target) for target in imports_of(module)), f"{module} is in an import cycle"


# modules a stage imports that record its outputs but do not decide them: not among its deps
NOT_DECIDING = {
    "tracking.run": "logs params, metrics, artifacts and the model to MLflow; no output file depends on it",
    "tracking.store": "finds and opens the MLflow store",
    "tracking.patience": "waits while the MLflow store is busy",
    "tracking.registry": "logs and registers the model in MLflow",
    "tracking.lifecycle": "samples system metrics into the run and ends it on any exit",
    "tracking.study_storage": "opens the sweep's study and waits while its database is unreachable",
}


def covered(module: str, deps: set[str]) -> bool:
    """Whether a dep (the module's file, or a folder holding it) covers the module."""
    path = f"src/cifar_rounds/{module.replace('.', '/')}.py"
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_exactly_the_code_that_decides_its_outputs(stage):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = {d for d in dvc["stages"][stage.split(".")[1]]["deps"] if d.startswith("src/")}
    deciding = closure(stage) - set(NOT_DECIDING)
    assert [m for m in deciding if not covered(m, deps)] == []
    assert [d for d in deps if not any(covered(m, {d}) for m in deciding)] == []  # none superfluous
    assert not any(covered(m, deps) for m in NOT_DECIDING)


def test_no_module_imports_a_stage_module():
    for module in modules():
        imported = imports_of(module) & set(STAGES)
        assert not imported - {module}, f"{module} imports the stage module(s) {imported}"


def test_tracking_and_report_import_no_torch_heavy_module():
    heavy = {
        "training.engine",
        "training.runtime",
        "training.trainer",
        "training.model",
        "data.augment",
        "training.diagnostics",
        "training.checkpoint",
    }
    for light in (
        "tracking.run",
        "analysis.report",
        "analysis.replicates",
        "analysis.verdict",
        "core.params",
        "core.names",
    ):
        assert not closure(light) & heavy, light


def test_the_docs_rounds_table_is_the_preset_files(monkeypatch):
    monkeypatch.chdir(REPO)
    readme = (REPO / "docs" / "rounds-and-verdict.md").read_text()
    header = re.search(r"^\| \| (learning_rate.*) \|$", readme, re.M).group(1).split(" | ")
    for name in preset_names():
        row = re.search(rf"^\| {name} \| (.*) \|$", readme, re.M).group(1).split(" | ")
        preset = load_preset(name)
        assert {f"train.{h}": yaml.safe_load(v) for h, v in zip(header, row)} == preset, name


def preset_values_in(source: str, presets: dict[str, dict[str, object]]) -> list[str]:
    """Where `source` (Python) spells a preset's value: a milestone list anywhere, or a number bound to the
    parameter's name (keyword, assignment or dict key, however the number is written: 5e-4 is 0.0005)."""
    keyed = {(k.split(".")[-1], v) for p in presets.values() for k, v in p.items() if not isinstance(v, list)}
    lists = {tuple(v) for p in presets.values() for v in p.values() if isinstance(v, list)}
    found = []
    for node in ast.walk(ast.parse(source)):
        pairs = []
        if isinstance(node, ast.keyword) and node.arg:
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            pairs += [(t.id, node.value) for t in targets if isinstance(t, ast.Name) and node.value is not None]
        elif isinstance(node, ast.Dict):
            pairs += [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.List | ast.Tuple):
            try:
                if tuple(ast.literal_eval(node)) in lists:
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
            except (ValueError, TypeError):  # not a literal, or one holding unhashable values
                pass
        for name, value in pairs:
            try:
                literal = ast.literal_eval(value)
            except ValueError:
                continue
            if isinstance(name, str) and not isinstance(literal, list | dict | set):
                if (name.split(".")[-1].lower(), literal) in keyed:
                    found.append(f"line {node.lineno}: {name} = {ast.unparse(value)}")
    return found


def test_round_values_live_in_the_presets_not_in_code(monkeypatch):
    """The rounds' values live in rounds/*.yaml (and params.yaml, the working copy), not in code, however spelt."""
    monkeypatch.chdir(REPO)
    presets = {name: load_preset(name) for name in preset_names()}
    spelt = "f(weight_decay=5e-4, lr_milestones=(60, 120, 160))\nbatch_size = 96\nx = {'train.patience': 35}"
    assert sorted(preset_values_in(spelt, presets)) == [
        "line 1: (60, 120, 160)",
        "line 1: weight_decay = 0.0005",
        "line 2: batch_size = 96",
        "line 3: train.patience = 35",
    ]
    for path in PACKAGE.glob("**/*.py"):
        assert preset_values_in(path.read_text(), presets) == [], path
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())
    defaults = [p.get("default") for e in mlproject["entry_points"].values() for p in e.get("parameters", {}).values()]
    assert not [d for d in defaults if d in [v for p in presets.values() for v in p.values()]]


def test_dvc_yaml_declares_the_best_checkpoint_as_a_model_artifact():
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format

    with Repo(str(REPO)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
        ((name, artifact),) = artifacts.items()
        check_name_format(name)  # what `dvc artifacts get` and Studio accept
        train_outs = {o.def_path for s in repo.index.stages if s.name == "train" for o in s.outs}
    models_dir = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["models_dir"]
    assert artifact.type == "model" and artifact.path == f"{models_dir}/{BEST_CHECKPOINT}"
    assert models_dir in train_outs  # the file the train stage writes


def test_the_code_is_formatted_and_lint_free():
    """`ruff format` and `ruff check` (pyflakes, pycodestyle, import order) as pyproject.toml configures them."""
    ruff = [sys.executable, "-m", "ruff"]
    for check in (["format", "--check", "."], ["check", "."]):
        result = subprocess.run([*ruff, *check], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_the_suites_longest_first_order_names_test_files_that_exist():
    from conftest import LONGEST_FIRST, TESTS

    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [name for name in LONGEST_FIRST if not (TESTS / name).is_file()] == []
