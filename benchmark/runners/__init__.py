"""Where a method runs for one grid cell: ``local`` (this process) or ``docker`` (an isolated container).

A runner is a callable ``runner(bench, ds, method, budget, seed, cell_dir) -> DistilledSet`` returning the method's
*raw* set; :meth:`benchmark.pipeline.Bench.distill` then validates it and records it in the cell. Evaluation is
never a runner's business.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmark.distilled import DistilledSet
    from benchmark.pipeline import Bench

Runner = Callable[["Bench", str, str, int, int, Path], "DistilledSet"]
RUNNERS = ("local", "docker")


def run_local(bench: Bench, ds: str, method: str, budget: int, seed: int, cell_dir: Path) -> DistilledSet:
    """Run the method in this process (logs and checkpoints in ``cell_dir``)."""
    return bench.run_method(ds, method, budget, seed, cell_dir)


def get_runner(name: str) -> Runner:
    """The runner called ``name``; the docker runner reads its settings from ``MMDD_DOCKER_*`` variables."""
    if name == "local":
        return run_local
    if name == "docker":
        from benchmark.runners.docker import DockerRunner

        return DockerRunner.from_env()
    raise ValueError(f"unknown runner {name!r}: choose one of {list(RUNNERS)}")
