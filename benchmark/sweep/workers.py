"""Persistent worker processes for the local executor: each is ``python -m benchmark.worker``, imports torch (and,
on first use, torchvision and MLflow) once, and runs plain ``mmdd ...`` stage commands in-process, one at a time.

A worker that dies during a task (segfault, ``kill -9``, ``os._exit``) is reported as a failed attempt of that task
and replaced; so is one whose task failed, since its process state may be half-changed. Commands that need a shell
(pipes, redirections, ``&&``, expansions) or run another program keep the per-task subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Characters whose meaning a shell would change (expansions, globs, escapes, several lines): such commands keep the
# subprocess, even when the character is quoted, which costs start-up time but never changes what runs.
_SHELL_CHARS = frozenset("$`*?[]{}~\\\n")
_OPERATOR_CHARS = frozenset("();<>|&")


@dataclass(frozen=True)
class Outcome:
    """How a command ended: exit status (negative: killed by that signal), CPU seconds, peak memory, and the
    reason when the process running it died or never started."""

    returncode: int | None
    cpu_s: float | None = None
    max_rss_mb: float | None = None
    error: str = ""


def mmdd_argv(cmd: str) -> list[str] | None:
    """The arguments after ``mmdd`` of a plain ``mmdd ...`` command, or None when the command needs a shell."""
    if _SHELL_CHARS & set(cmd):
        return None
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: let the shell report it
        return None
    if len(words) < 2 or Path(words[0]).name != "mmdd" or any(set(w) <= _OPERATOR_CHARS for w in words):
        return None
    return words[1:]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Worker:
    """One ``python -m benchmark.worker`` process; ``run`` sends it one command and waits for the reply."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.spawned = time.time()
        with open(log_path, "ab") as err:
            # -P: import `benchmark` from the installation (or PYTHONPATH) the `mmdd` program would use, not from cwd
            self.proc = subprocess.Popen([sys.executable, "-P", "-m", "benchmark.worker"], cwd=cwd, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        self.start_s: float | None = None  # seconds from spawn to ready, once known
        self.healthy = True

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            return None
        return json.loads(line)

    def _died(self, when: str) -> Outcome:
        self.healthy = False
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        return Outcome(rc, error=f"worker process {self.pid} died {when} ({describe_exit(rc)}); its own log: "
                                 f"{self.log_path}")

    def ready(self) -> Outcome | None:
        """None once the worker has started; else why it could not."""
        if self.start_s is not None:
            return None
        msg = self._read()
        if msg is None or not msg.get("ready"):
            return self._died("while starting")
        self.start_s = max(0.0, float(msg["at"]) - self.spawned)
        return None

    def run(self, argv: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> Outcome:
        """Run ``mmdd ARGV`` in the worker with its output appended to ``log_path``."""
        failed = self.ready()
        if failed:
            return failed
        req = {"argv": argv, "cwd": str(cwd), "log": str(log_path), "env": env}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died("before the task was sent")
        reply = self._read()
        if reply is None:
            return self._died("while running the task")
        if "error" in reply:
            self.healthy = False
            return Outcome(None, error=reply["error"])
        self.healthy = reply["rc"] == 0
        return Outcome(int(reply["rc"]), float(reply["cpu_s"]), float(reply["max_rss_mb"]))

    def stop(self, timeout: float = 10.0) -> None:
        """Close its input (it exits once idle), then kill it if it has not exited within ``timeout`` seconds."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()


class WorkerPool:
    """Up to ``size`` workers, all started when the first one is needed; leased to one task at a time."""

    def __init__(self, size: int, env: dict[str, str], cwd: Path, log_dir: Path):
        self.size, self.env, self.cwd, self.log_dir = size, env, cwd, log_dir
        self._idle: list[Worker] = []
        self._spawned: list[Worker] = []
        self._lock = threading.Lock()

    def _spawn(self) -> Worker:
        w = Worker(self.env, self.cwd, self.log_dir / f"worker-{len(self._spawned) + 1:03d}.log")
        self._spawned.append(w)
        return w

    def start(self) -> None:
        """Start every slot's worker now (once), so their imports overlap with each other and the driver's work."""
        with self._lock:
            if not self._spawned:
                self._idle += [self._spawn() for _ in range(self.size)]

    def _take(self) -> Worker:
        self.start()
        with self._lock:
            return self._idle.pop() if self._idle else self._spawn()  # a replacement for a retired worker

    def _give_back(self, w: Worker) -> None:
        if w.healthy:
            with self._lock:
                self._idle.append(w)
        else:
            w.stop(timeout=10)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Worker]:
        w = self._take()
        try:
            yield w
        finally:
            self._give_back(w)

    def stats(self) -> dict[str, float | int]:
        """Workers started (replacements included) and their summed start-up seconds (spawn to ready)."""
        return {"workers_started": len(self._spawned),
                "worker_start_s": round(sum(w.start_s or 0.0 for w in self._spawned), 3)}

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), []
        for w in idle:
            w.stop()
