"""Which source files a stage runs: the static import closure of a module within the project.

DVC re-runs a stage when one of its deps changes, so each stage lists the project files its code imports,
transitively — lazy (function-level) imports included, since a stage runs them. Modules outside the project
(torch, an installed third-party package) are not listed: the pinned environment covers them.

:func:`code_digest` hashes the same files, so a stage's own content key changes whenever DVC would rerun it for
its code: a stage that DVC reruns after a code change recomputes, instead of finding its old output "up to date".
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def module_path(name: str, root: Path) -> Path | None:
    """The file of module ``name`` if it lies under ``root`` (a package resolves to its ``__init__.py``)."""
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


@lru_cache(maxsize=None)
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """Module names imported anywhere in ``path`` (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]
    return tuple(names)


def closure(modules: list[str], root: Path) -> list[Path]:
    """Project files reached from ``modules`` by imports, parents' ``__init__.py`` included, sorted."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            sub = ".".join(parts[:i])
            if sub in seen:
                continue
            path = module_path(sub, root)
            if path is None:
                continue
            seen[sub] = path
            todo += list(_imports(path, sub))
    return sorted(set(seen.values()))


def class_module_file(module: str, root: Path) -> Path | None:
    """The file of an installed module if it lies under ``root`` (methods of other packages are outside)."""
    path = module_path(module, root)
    if path is not None:
        return path
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin).resolve()
    return origin if origin.is_relative_to(root.resolve()) else None


def code_digest(modules: tuple[str, ...], root: Path | None = None) -> str:
    """sha256 of the source a stage runs: the project files reached from ``modules`` (as DVC lists them), plus the
    file of any module outside the project (an installed method's module), by path and content."""
    root = Path(root or PROJECT_ROOT)
    files = list(closure(list(modules), root))
    for name in modules:
        if module_path(name, root) is None:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                files.append(Path(spec.origin).resolve())
    h = hashlib.sha256()
    for path in sorted(set(files)):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]
