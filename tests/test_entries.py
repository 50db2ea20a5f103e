"""``mmdd new-method`` scaffolds entries that ``mmdd check-entry`` passes; broken entries fail naming the rule."""

from __future__ import annotations

import argparse
import importlib.util
import os
import py_compile
import sys
import tomllib
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from benchmark import registry
from benchmark.distilled import DistilledSet, Phase
from benchmark.entries import add_entry_commands, check_entry, run_entry_command
from benchmark.interface import DistillTask, Method
from tests.docker_env import image_if_available
from tests.helpers import private_registry as fresh_registry


def mmdd(*argv: str) -> int:
    """``mmdd`` with the entry commands (through the real CLI once it wires them)."""
    from benchmark import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "new-method" in sub.choices:
        return cli.main(list(argv))
    parser = argparse.ArgumentParser(prog="mmdd")
    add_entry_commands(parser.add_subparsers(dest="command", required=True))
    return run_entry_command(parser.parse_args(list(argv)))


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations (and modules or sys.path entries of scaffolded packages) made by a test vanish with it."""
    monkeypatch.setattr(registry, "_REGISTRY", fresh_registry())
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("my_entry", "scaffolded_my_tree"):
            del sys.modules[name]


def test_scaffolded_package_passes_check_entry(tiny_project, tmp_path, private_registry, monkeypatch, capsys):
    root, _ = tiny_project
    project = tmp_path / "mmdd-my-entry"
    assert mmdd("new-method", "my-entry", "--out-of-tree", str(project)) == 0
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["mmdd.methods"] == {"my-entry": "my_entry.method:MyEntryMethod"}
    readme = (project / "README.md").read_text()
    for fieldname in ("Paper", "What is distilled", "Storage", "mmdd check-entry my-entry --project ."):
        assert fieldname in readme
    for path in project.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)

    image = image_if_available()
    if image:
        monkeypatch.setenv("MMDD_DOCKER_IMAGE", image)
    capsys.readouterr()
    assert mmdd("check-entry", "my-entry", "--project", str(project), "--data-root", str(root / "data"),
                "--docker", "require" if image else "off") == 0
    out = capsys.readouterr().out
    assert "check-entry my-entry: passed" in out
    for rule in ("registers", "valid", "deterministic", "resumes"):
        assert f"PASS  {rule}" in out
    assert ("PASS  container" if image else "SKIP  container") in out
    if image:
        assert "identical to the local run" in out


def test_scaffolded_in_tree_method_needing_experts_runs_without_touching_the_harness(tiny_project, tmp_path,
                                                                                    private_registry):
    root, _ = tiny_project
    repo = tmp_path / "repo"
    (repo / "methods").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\n\n[project.entry-points."mmdd.methods"]\n'
                                         'random = "methods.coresets.random:RandomCoreset"\n')
    assert mmdd("new-method", "my_tree", "--root", str(repo)) == 0
    pkg = repo / "methods" / "my_tree"
    assert sorted(p.name for p in pkg.iterdir()) == ["README.md", "__init__.py", "method.py"]
    entry_points = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["entry-points"]["mmdd.methods"]
    assert entry_points["my_tree"] == "methods.my_tree.method:MyTreeMethod"  # registered like an external package
    test_file = repo / "tests" / "test_method_my_tree.py"
    for path in (*pkg.glob("*.py"), test_file):
        py_compile.compile(str(path), doraise=True)
    assert "tiny_project" in test_file.read_text()

    # the method asks for expert trajectories through its requirements and reads them: only its own file changes
    method_py = pkg / "method.py"
    text = method_py.read_text()
    text = text.replace("        return []\n", "        return [Requirement(EXPERTS)]\n", 1)
    text = text.replace("        p = task.params\n", "        p = task.params\n        assert len(task.require_experts(self.name)) > 0\n", 1)
    method_py.write_text(text)
    spec = importlib.util.spec_from_file_location("scaffolded_my_tree", method_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = registry.register_method("my_tree")(module.MyTreeMethod)  # what loading the entry point does
    assert [r.kind for r in cls.requirements({}, 10)] == ["experts"]
    report = check_entry("my_tree", data_root=root / "data", docker="off")
    assert report.ok, report.render()


def test_new_method_refuses_taken_or_bad_names_and_writes_nothing(tmp_path, private_registry, caplog):
    target = tmp_path / "pkg"
    assert mmdd("new-method", "random", "--out-of-tree", str(target)) == 2
    assert "already registered" in caplog.text
    assert mmdd("new-method", "Bad Name", "--out-of-tree", str(target)) == 2
    assert "must be 2-40 characters" in caplog.text
    assert not target.exists()
    target.mkdir()
    (target / "keep").write_text("x")
    assert mmdd("new-method", "fine_name", "--out-of-tree", str(target)) == 2
    assert "not empty" in caplog.text and sorted(os.listdir(target)) == ["keep"]
    assert mmdd("new-method", "fine_name", "--root", str(tmp_path)) == 2
    assert "not the mmdd-bench repository" in caplog.text


# ------------------------------------------------------------------------------------------ broken entries
class _RealPairs(Method):
    """Returns the first ``budget`` real pairs; subclasses break one rule each."""

    defaults: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}}

    def pairs(self, task: DistillTask) -> int:
        return task.budget

    def distill(self, task: DistillTask) -> DistilledSet:
        x, t = task.train.pairs(torch.arange(self.pairs(task)))
        return DistilledSet([Phase(images=self.images(x.float().clone()), texts=self.texts(t.float().clone()),
                                   lr_img=0.1, lr_txt=0.1)])

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def texts(self, t: torch.Tensor) -> torch.Tensor:
        return t


class OverBudget(_RealPairs):
    def pairs(self, task):
        return task.budget + 1


class NaNOutput(_RealPairs):
    def texts(self, t):
        t[0, 0] = float("nan")
        return t


class WrongShapes(_RealPairs):
    def images(self, x):
        return F.interpolate(x, size=8)


class NonDeterministic(_RealPairs):
    def images(self, x):
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return x + 0.01 * torch.randn(x.shape, generator=gen)


class NeverCheckpoints(_RealPairs):
    defaults = {"tiny": {"checkpoint_every": 5}}


class Raises(_RealPairs):
    def distill(self, task):
        raise RuntimeError("boom")


@pytest.mark.parametrize("cls, rule", [
    (OverBudget, "rule 'budget': 11 pairs exceed the budget of 10"),
    (NaNOutput, "rule 'finite'"),
    (WrongShapes, "rule 'shapes'"),
    (NonDeterministic, "rule 'deterministic'"),
    (NeverCheckpoints, "rule 'resumes'"),
    (Raises, "rule 'runs': the method raised RuntimeError: boom"),
])
def test_broken_entry_fails_naming_the_rule(tiny_project, private_registry, cls, rule):
    root, _ = tiny_project
    name = f"broken-{cls.__name__.lower()}"
    registry.register_method(name)(cls)
    report = check_entry(name, data_root=root / "data", docker="off")
    assert not report.ok
    assert rule in report.failed.detail, report.render()
    assert report.results[-1] is report.failed  # stops at the first broken rule


def test_check_entry_cli_exit_code_and_unknown_name(tiny_project, private_registry, capsys):
    root, _ = tiny_project
    registry.register_method("broken-cli")(OverBudget)
    assert mmdd("check-entry", "broken-cli", "--data-root", str(root / "data"), "--docker", "off") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "FAIL  valid" in out and "rule 'budget'" in out
    assert mmdd("check-entry", "no-such-method", "--docker", "off") == 1
    assert "FAIL  registers     rule 'registers': unknown method 'no-such-method'" in capsys.readouterr().out
