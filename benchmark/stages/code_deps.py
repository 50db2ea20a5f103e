"""Which source files a stage runs: the static import closure of a module within the project.

DVC re-runs a stage when one of its deps changes, so each stage lists the project files its code imports,
transitively — lazy (function-level) imports included, since a stage runs them. Modules outside the project
(torch, an installed third-party package) are not listed: the pinned environment covers them.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path


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
