"""Grid cells, where their outputs live, and the content keys that say when an output is up to date.

A key is a hash of everything an output is a function of — configuration values *and the bytes of the input files*
— so replacing an input (a distilled set, an expert file) makes the output stale even when its metadata matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class Cell:
    """One grid cell: a method's distilled set for one dataset, budget and seed."""

    dataset: str
    method: str
    budget: int
    seed: int

    def __str__(self) -> str:
        return f"{self.dataset}/{self.method}/b{self.budget}/s{self.seed}"


def hash_json(obj: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over the names (relative to ``root``) and bytes of files; a missing file is an error."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        name = p.relative_to(root).as_posix() if root else p.name
        h.update(name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


def dir_digest(directory: Path, pattern: str = "*") -> str:
    """:func:`tree_digest` of every regular file under ``directory`` matching ``pattern`` (recursively)."""
    files = [p for p in Path(directory).rglob(pattern) if p.is_file() and not p.name.startswith(".")]
    return tree_digest(files, Path(directory))


def read_history(cell_dir: Path) -> list[dict[str, float]]:
    """The per-iteration distillation log of a cell joined with its measurements (empty for methods that log
    nothing)."""
    rows: dict[int, dict[str, float]] = {}
    for name in ("distill_log.jsonl", "distill_log.volatile.jsonl"):
        path = cell_dir / name
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    rows.setdefault(int(rec["step"]), {}).update(rec)
    return [rows[k] for k in sorted(rows)]
