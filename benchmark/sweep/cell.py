"""One task of the sweep, as it runs on a worker: the stage's exact command in the project directory (in a shell,
or in-process in a persistent worker for a plain ``mmdd`` command), its output appended to a per-task log. A pure
function of its config writing to deterministic paths, so it can run anywhere the project directory is mounted at
the same path.
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
from benchmark.sweep.workers import Outcome, WorkerPool, describe_exit, mmdd_argv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """How one attempt of a task ended (``cpu_s``/``max_rss_mb``: the process that ran the command, when known;
    ``mode``: ``subprocess`` or ``worker``)."""

    task: str
    attempt: int
    ok: bool
    seconds: float
    host: str
    node: str
    pid: int
    returncode: int | None = None
    error: str = ""
    cpu_s: float | None = None
    max_rss_mb: float | None = None
    mode: str = "subprocess"


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


def task_process_env(env: dict[str, str]) -> dict[str, str]:
    """The environment a task's command runs in (subprocess or worker): this process's, ``env``, no progress bars,
    unbuffered output, and this installation's ``mmdd`` first on PATH."""
    child_env = {**os.environ, **env, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    # The interpreter running this task belongs to the installation that provides `mmdd` on this node.
    child_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), child_env.get("PATH", "")])
    return child_env


def _shell(cmd: str, cwd: Path, env: dict[str, str], out) -> Outcome:
    """The command in a shell, output to ``out``; CPU time and peak memory of that process tree from ``wait4``."""
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=task_process_env(env), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return Outcome(proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def run_task(task: Task, root: str, attempt: int, env: dict[str, str], device: str | None = None,
             node: str = "local", workers: WorkerPool | None = None) -> Result:
    """Run one attempt of ``task`` in the project at ``root``; never raises for a failing command.

    With ``workers``, a plain ``mmdd ...`` command runs in-process in one of them; anything else in a shell.
    """
    host = socket.gethostname()
    project = Path(root)
    if not (project / "dvc.yaml").exists():
        return Result(task.id, attempt, False, 0.0, host, node, os.getpid(),
                      error=f"project directory {project} is not visible on host {host}: put the project on storage "
                            "that every node mounts at the same path (docs/cluster.md)")
    cmd = _with_device(task.cmd, device)
    argv = mmdd_argv(cmd) if workers is not None else None
    if argv is None:
        return _attempt(task, project, attempt, node, cmd, os.getpid(), "subprocess",
                        lambda cwd, out: _shell(cmd, cwd, env, out))
    with workers.lease() as worker:
        return _attempt(task, project, attempt, node, cmd, worker.pid, "worker",
                        lambda cwd, out: worker.run(argv, cwd, Path(out.name), env))


def _attempt(task: Task, project: Path, attempt: int, node: str, cmd: str, pid: int, mode: str, run) -> Result:
    """Clean up after an interrupted attempt, then ``run(cwd, log file)`` between a header and a footer line."""
    host, t0 = socket.gethostname(), time.perf_counter()
    removed = remove_partials(project, task.partials)
    for p in removed:
        log.warning("%s: removed %s, left by an interrupted attempt", task.id, p)
    log_path = project / task.log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"=== mmdd sweep | {task.id} | attempt {attempt} | host {host} | node {node} | pid {pid} | "
                  f"{stamp} ===\n")
        out.writelines(f"removed {p}, left by an interrupted attempt\n" for p in removed)
        out.write(f"$ {cmd}\n" if mode == "subprocess" else f"$ {cmd}    # in-process, worker pid {pid}\n")
        out.flush()
        start = out.tell()
        outcome = run(project / task.wdir, out)
        seconds = time.perf_counter() - t0
        if outcome.error:
            out.write(f"=== {outcome.error} ===\n")
        out.write(f"=== exit {outcome.returncode} after {seconds:.1f} s ===\n")
    rc = outcome.returncode
    ok = rc == 0 and not outcome.error
    error = "" if ok else (outcome.error or _tail(log_path, start) or describe_exit(rc))
    return Result(task.id, attempt, ok, seconds, host, node, pid, rc, error, outcome.cpu_s, outcome.max_rss_mb, mode)
