"""Where a method runs for one grid cell: ``local`` (a separate process on this machine) or ``docker`` (an
isolated container).

A runner is a callable ``runner(spec: CellSpec) -> DistilledSet`` returning the method's *raw* set;
:func:`benchmark.stages.distill.distill` then validates it and records it in the cell. Evaluation is never a
runner's business. Runners get plain data (:class:`~benchmark.runners.spec.CellSpec`) and never import the
pipeline; both run ``mmdd run-method`` on the same read-only configuration file.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmark.distilled import DistilledSet
from benchmark.runners.outputs import collect_set
from benchmark.runners.spec import CellSpec, SandboxLimits, config_text

log = logging.getLogger(__name__)
Runner = Callable[[CellSpec], DistilledSet]
RUNNERS = ("local", "docker")
LOCAL_WORK_DIR = ".local"

__all__ = ["RUNNERS", "CellSpec", "Runner", "SandboxLimits", "get_runner", "run_local"]


def _import_root(module: str) -> str:
    """The ``sys.path`` entry a child process needs to import ``module``'s top-level package as this one does."""
    mod = importlib.import_module(module.split(".")[0])
    file = getattr(mod, "__file__", None)
    if file:
        path = Path(file)
        return str(path.parent.parent if path.name == "__init__.py" else path.parent)
    return str(Path(list(mod.__path__)[0]).parent)  # namespace package


def run_local(spec: CellSpec) -> DistilledSet:
    """Run the method in a child process on this machine (no sandbox: for trusted, in-tree methods); its
    scratch directory is ``<cell>/.local`` (checkpoints survive a failure, for resume)."""
    from benchmark.registry import get_method

    cls = get_method(spec.method)
    work = Path(spec.work_dir) / LOCAL_WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    register = [] if cls.__module__.split(".")[0] in ("benchmark", "methods") else \
        ["--register", f"{spec.method}={cls.__module__}:{cls.__qualname__}"]
    paths = [_import_root("benchmark"), _import_root("methods"), _import_root(cls.__module__)]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([*paths, *inherited]))}
    with tempfile.TemporaryDirectory(prefix="mmdd-local-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(config_text(spec.config_doc))
        cmd = [sys.executable, "-m", "benchmark.method_entry", *register, "--", "run-method", "--params",
               str(config), "--dataset", spec.dataset, "--data-root", str(spec.data_root), "--results-root",
               str(Path(tmp) / "results"), "--method", spec.method, "--budget", str(spec.budget), "--seed",
               str(spec.seed), "--work-dir", str(work), "--device", spec.device, "--no-progress"]
        log.info("running %s (b=%d, s=%d) in a child process", spec.method, spec.budget, spec.seed)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace",
                              timeout=spec.limits.timeout_s)
    if proc.returncode != 0:
        tail = "\n  ".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"method {spec.method!r} failed (exit {proc.returncode}); last output:\n  {tail}")
    dset = collect_set(work, Path(spec.work_dir) / "distill_log.jsonl", spec.limits.out_max_bytes)
    shutil.rmtree(work)
    return dset


def get_runner(name: str) -> Runner:
    """The runner called ``name``; the docker runner reads its image settings from ``MMDD_DOCKER_*`` variables."""
    if name == "local":
        return run_local
    if name == "docker":
        from benchmark.runners.docker import DockerRunner

        return DockerRunner.from_env()
    raise ValueError(f"unknown runner {name!r}: choose one of {list(RUNNERS)}")
