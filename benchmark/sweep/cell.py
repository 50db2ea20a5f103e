"""One task of the sweep, as it runs on a worker: the stage's exact command in the project directory, its output
appended to a per-task log. A pure function of its config writing to deterministic paths, so it can run anywhere the
project directory is mounted at the same path.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmark.sweep.stages import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """How one attempt of a task ended."""

    task: str
    attempt: int
    ok: bool
    seconds: float
    host: str
    node: str
    pid: int
    returncode: int | None = None
    error: str = ""


def remove_partials(root: Path, globs: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files an interrupted attempt left (see :func:`~benchmark.sweep.stages.partial_globs`),
    so they never end up inside an output that DVC records."""
    removed = []
    for pattern in globs:
        for p in root.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _with_device(cmd: str, device: str | None) -> str:
    """Append ``--device`` to an ``mmdd`` command that does not choose one (the GPU a scheduler assigned)."""
    if not device or "--device" in cmd:
        return cmd
    return f"{cmd} --device {shlex.quote(device)}"


def _tail(path: Path, start: int, limit: int = 4000) -> str:
    """The last meaningful line the command wrote to its log after offset ``start`` (the error ``mmdd`` reports)."""
    with open(path, "rb") as f:
        f.seek(max(start, path.stat().st_size - limit))
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("===")]
    return lines[-1] if lines else ""


def run_task(task: Task, root: str, attempt: int, env: dict[str, str], device: str | None = None,
             node: str = "local") -> Result:
    """Run one attempt of ``task`` in the project at ``root``; never raises for a failing command."""
    host, pid, t0 = socket.gethostname(), os.getpid(), time.perf_counter()
    project = Path(root)
    if not (project / "dvc.yaml").exists():
        return Result(task.id, attempt, False, 0.0, host, node, pid,
                      error=f"project directory {project} is not visible on host {host}: put the project on storage "
                            "that every node mounts at the same path (docs/cluster.md)")
    removed = remove_partials(project, task.partials)
    for p in removed:
        log.warning("%s: removed %s, left by an interrupted attempt", task.id, p)
    log_path = project / task.log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _with_device(task.cmd, device)
    child_env = {**os.environ, **env, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    # The interpreter running this task belongs to the installation that provides `mmdd` on this node.
    child_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), child_env.get("PATH", "")])
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"=== mmdd sweep | {task.id} | attempt {attempt} | host {host} | node {node} | pid {pid} | "
                  f"{stamp} ===\n")
        out.writelines(f"removed {p}, left by an interrupted attempt\n" for p in removed)
        out.write(f"$ {cmd}\n")
        out.flush()
        start = out.tell()
        rc = subprocess.call(cmd, shell=True, cwd=project / task.wdir, env=child_env, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        out.write(f"=== exit {rc} after {seconds:.1f} s ===\n")
    error = "" if rc == 0 else (_tail(log_path, start) or f"exit status {rc}")
    return Result(task.id, attempt, rc == 0, seconds, host, node, pid, rc, error)
