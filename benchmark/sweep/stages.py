"""The DVC pipeline as the sweep sees it: stages with their commands, upstream stages and outputs, and the tasks
they run as.

The stage graph comes from DVC's own parser (``foreach``/``matrix`` and ``${...}`` resolved exactly as ``dvc repro``
does), through :class:`benchmark.sweep.ledger.Ledger`, which also answers status and records commits from the driver
only, one call at a time.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

# mmdd subcommands that do heavy tensor work: on a GPU cluster each of their tasks gets a GPU.
GPU_COMMANDS = frozenset({"embed", "experts", "distill", "evaluate", "cross-arch", "full-data"})


class SweepError(RuntimeError):
    """A problem with the project or the cluster that stops the sweep before it starts."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage, e.g. ``distill-lors@shapes-10-0``."""

    name: str
    cmd: str
    wdir: str  # relative to the project root
    upstream: tuple[str, ...]
    outs: tuple[str, ...]  # relative to the project root

    @property
    def group(self) -> str:
        """The ``foreach``/``matrix`` stage this one was generated from (``distill-lors``)."""
        return self.name.split("@", 1)[0]

    @property
    def mmdd_command(self) -> str | None:
        """The ``mmdd`` subcommand the stage runs (``distill``), or None for another program."""
        try:
            words = shlex.split(self.cmd)
        except ValueError:
            return None
        if len(words) >= 2 and Path(words[0]).name == "mmdd":
            return words[1]
        return None


@dataclass(frozen=True)
class Task:
    """What one Ray task (or local worker) runs: a whole stage, or one expert index of an ``experts`` stage."""

    id: str
    stage: str
    cmd: str
    wdir: str
    partials: tuple[str, ...]  # globs (relative to the root) of temp files this task may have left half-written
    wants_gpu: bool
    log: str  # relative to the project root


def select(stages: dict[str, Stage], targets: Iterable[str]) -> set[str]:
    """The targets (stage names or groups such as ``distill-lors``) and everything upstream of them."""
    targets = list(targets)
    if not targets:
        return set(stages)
    wanted = set()
    for t in targets:
        hits = [n for n, s in stages.items() if n == t or s.group == t]
        if not hits:
            raise SweepError(f"unknown stage {t!r}: `dvc stage list` shows the stage names")
        wanted.update(hits)
    todo = list(wanted)
    while todo:
        for u in stages[todo.pop()].upstream:
            if u not in wanted:
                wanted.add(u)
                todo.append(u)
    return wanted


def levels(stages: dict[str, Stage], names: Iterable[str] | None = None) -> list[list[str]]:
    """Stages grouped by dependency depth: every stage comes after all of its upstream stages."""
    names = set(stages) if names is None else set(names)
    depth: dict[str, int] = {}

    def visit(n: str, path: tuple[str, ...] = ()) -> int:
        if n in path:
            raise SweepError(f"dependency cycle through {n!r}")
        if n not in depth:
            depth[n] = 1 + max((visit(u, path + (n,)) for u in stages[n].upstream if u in names), default=-1)
        return depth[n]

    for n in names:
        visit(n)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in stages:  # dvc.yaml order within a level
        if n in names:
            out[depth[n]].append(n)
    return out


def _num_experts(root: Path) -> int | None:
    path = root / "params.yaml"
    if not path.exists():
        return None
    n = ((yaml.safe_load(path.read_text()) or {}).get("experts") or {}).get("num_experts")
    return int(n) if n else None


def partial_globs(outs: tuple[str, ...], name: str = ".*") -> tuple[str, ...]:
    """Where an interrupted atomic write (``benchmark.io.atomic_path``: ``.<name>.*.tmp`` beside its target) of
    these outputs leaves its temporary file: beside a file output, anywhere inside a directory output."""
    globs = []
    for out in outs:
        parent, base = os.path.split(out)
        if name == ".*":
            globs.append(os.path.join(parent, f".{base}.*.tmp"))
        globs.append(os.path.join(out, "**", f"{name}.tmp"))
    return tuple(globs)


def tasks_for(stage: Stage, root: Path, log_dir: str) -> list[Task]:
    """The tasks of a stage: one per expert index for ``mmdd experts`` (so N experts spread over N GPUs), else one."""
    gpu = stage.mmdd_command in GPU_COMMANDS
    n = _num_experts(root) if stage.mmdd_command == "experts" and "--index" not in stage.cmd else None
    if n:  # parallel experts share the output directory: each cleans up only its own files
        return [Task(f"{stage.name}[{k}]", stage.name, f"{stage.cmd} --index {k}", stage.wdir,
                     partial_globs(stage.outs, f".expert_{k:03d}.*"), gpu, f"{log_dir}/{stage.name}.expert{k:03d}.log")
                for k in range(n)]
    return [Task(stage.name, stage.name, stage.cmd, stage.wdir, partial_globs(stage.outs), gpu,
                 f"{log_dir}/{stage.name}.log")]
