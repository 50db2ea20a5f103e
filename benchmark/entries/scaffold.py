"""``mmdd new-method``: scaffold a method entry from ``benchmark/templates`` (in-tree, or an out-of-tree package
registering through the ``mmdd.methods`` entry point). Files appear all at once or not at all."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from benchmark import __version__

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{1,39}$")


def _names(name: str) -> dict[str, str]:
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be 2-40 characters of a-z, 0-9, '_' or '-', starting with a "
                         "letter (e.g. my_method)")
    module = name.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name) if part) + "Method"
    return {"name": name, "module": module, "cls": cls, "suite_version": __version__}


def _render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{\w+\}\}", text)
    if leftover:  # a template bug, not a user error
        raise RuntimeError(f"template {template} has unfilled fields {leftover}")
    return text


def _write_tree(target: Path, files: dict[str, str]) -> None:
    """Create directory ``target`` holding ``files`` (relative path -> text) all at once: written beside it, then
    renamed, so a failure leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_file(path: Path, text: str) -> None:
    from benchmark.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


ENTRY_TABLE = '[project.entry-points."mmdd.methods"]\n'


def scaffold_in_tree(name: str, root: Path) -> list[Path]:
    """Scaffold ``methods/<module>/`` (class, README) and ``tests/test_method_<module>.py`` in the repository at
    ``root``, and register the class under the ``mmdd.methods`` entry points of ``pyproject.toml`` (the same path
    an external package takes; reinstall with ``pip install --no-deps -e .``). Returns the created paths."""
    v = _names(name)
    root = Path(root)
    pyproject = root / "pyproject.toml"
    if not (root / "methods").is_dir() or not pyproject.is_file() or ENTRY_TABLE not in pyproject.read_text():
        raise ValueError(f"{root} is not the mmdd-bench repository (no methods/ or no mmdd.methods entry-point "
                         "table in pyproject.toml): run from its root, pass --root, or scaffold a separate package "
                         "with --out-of-tree DIR")
    _refuse_taken(name)
    pkg = root / "methods" / v["module"]
    test = root / "tests" / f"test_method_{v['module']}.py"
    for path in (pkg, test):
        if path.exists():
            raise ValueError(f"{path} already exists: choose another name or remove it")
    values = {**v, "dockerfile_hint": 'e.g. "Dockerfile"', "method_path": f"methods/{v['module']}/method.py",
              "test_path": str(test.relative_to(root)), "check_args": ""}
    _write_tree(pkg, {
        "__init__.py": f'"""The ``{name}`` method (see README.md)."""\n',
        "method.py": _render("method.py.tmpl", values),
        "README.md": _render("README.md.tmpl", values),
    })
    try:
        _write_file(test, _render("test_intree.py.tmpl", values))
        text = pyproject.read_text()
        entry = f'{name} = "methods.{v["module"]}.method:{v["cls"]}"\n'
        _write_file(pyproject, text.replace(ENTRY_TABLE, ENTRY_TABLE + entry, 1))
    except BaseException:
        shutil.rmtree(pkg, ignore_errors=True)
        test.unlink(missing_ok=True)
        raise
    return [pkg, test, pyproject]


def scaffold_package(name: str, directory: Path) -> list[Path]:
    """Scaffold an out-of-tree package in ``directory`` that registers through the ``mmdd.methods`` entry point."""
    v = _names(name)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not empty: choose a new directory")
    _refuse_taken(name)
    mod = v["module"]
    values = {**v, "dockerfile_hint": '"../../Dockerfile"',
              "method_path": f"src/{mod}/method.py", "test_path": f"tests/test_{mod}.py",
              "check_args": " --project ."}
    files = {
        "pyproject.toml": _render("pyproject.toml.tmpl", values),
        "README.md": _render("README.md.tmpl", values),
        "Dockerfile": _render("Dockerfile.tmpl", values),
        f"src/{mod}/__init__.py": f'"""The ``{name}`` method for mmdd-bench (see README.md)."""\n',
        f"src/{mod}/method.py": _render("method.py.tmpl", values),
        f"tests/test_{mod}.py": _render("test_package.py.tmpl", values),
    }
    if directory.exists():
        directory.rmdir()
    _write_tree(directory, files)
    return [directory / rel for rel in files]


def _refuse_taken(name: str) -> None:
    from benchmark.registry import available_methods

    if name in available_methods():
        raise ValueError(f"method name {name!r} is already registered: choose another (see `mmdd methods`)")
